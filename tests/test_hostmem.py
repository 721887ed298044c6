"""The host allocator setting (grpo_jax/hostmem.py): when it restarts, what it passes on, and
that the restarted process really runs with the tunable and fewer page faults."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from grpo_jax import hostmem

USABLE = hostmem.tunables_env({hostmem.ENV: "auto"}) is not None  # Linux, glibc >= 2.35, THP not "never"


def test_tunables_env_rules(monkeypatch):
    monkeypatch.setattr(hostmem, "_glibc_version", lambda: (2, 36))
    monkeypatch.setattr(hostmem, "_thp_available", lambda: True)
    monkeypatch.setattr(hostmem.sys, "platform", "linux")
    assert hostmem.tunables_env({"PATH": "/bin"})["GLIBC_TUNABLES"] == hostmem.TUNABLE  # default
    auto = {hostmem.ENV: "auto"}
    env = hostmem.tunables_env({"PATH": "/bin", **auto})
    assert env["GLIBC_TUNABLES"] == hostmem.TUNABLE and env["PATH"] == "/bin"
    assert env[hostmem._MARK] == "1"
    # other tunables are kept, ours appended
    env = hostmem.tunables_env({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512", **auto})
    assert env["GLIBC_TUNABLES"] == f"glibc.rtld.optional_static_tls=512:{hostmem.TUNABLE}"
    # no restart: already restarted, the user chose a malloc tunable, opted out, old glibc, no THP
    assert hostmem.tunables_env({hostmem._MARK: "1", **auto}) is None
    assert hostmem.tunables_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", **auto}) is None
    assert hostmem.tunables_env({hostmem.ENV: "off"}) is None
    assert hostmem.tunables_env({hostmem.ENV: "keep"}) is None
    monkeypatch.setattr(hostmem, "_glibc_version", lambda: (2, 31))
    assert hostmem.tunables_env(auto) is None
    monkeypatch.setattr(hostmem, "_glibc_version", lambda: (2, 36))
    monkeypatch.setattr(hostmem, "_thp_available", lambda: False)
    assert hostmem.tunables_env(auto) is None
    with pytest.raises(ValueError, match="GRPO_JAX_MALLOC='yes': expected auto, keep or off"):
        hostmem.tunables_env({hostmem.ENV: "yes"})


def test_configure_does_not_restart_once_jax_is_imported(monkeypatch):
    import jax  # noqa: F401  (imported by the test session anyway)

    monkeypatch.delenv(hostmem._MARK, raising=False)
    monkeypatch.setenv(hostmem.ENV, "auto")
    monkeypatch.setattr(hostmem.os, "execve", lambda *a: pytest.fail("restarted after jax import"))
    monkeypatch.setattr(hostmem, "retain_freed_memory", lambda: True)
    assert hostmem.configure() == "retain"
    monkeypatch.setenv(hostmem.ENV, "off")
    assert hostmem.configure() == "none"


# A program that calls configure() first, as `grpo-jax` does, then runs a jitted gradient with
# ~100 MiB of temporaries twice and reports the page faults of the second call.
PROGRAM = textwrap.dedent("""
    import json, os, resource, sys
    from grpo_jax import hostmem
    mode = hostmem.configure()
    import jax, jax.numpy as jnp

    def loss(ws, x):  # 4 residual MLP blocks on 4096 rows: ~100 MiB of temporaries in the grad
        for w1, w2 in ws:
            x = x + jnp.tanh(x @ w1) @ w2
        return (x * x).mean()

    f = jax.jit(lambda ws, x: jax.grad(loss)(ws, x)[0][0].sum())
    x = jnp.full((4096, 256), 1e-2, jnp.float32)
    ws = [(jnp.full((256, 1024), 1e-2, jnp.float32), jnp.full((1024, 256), 1e-2, jnp.float32))
          for _ in range(4)]
    f(ws, x).block_until_ready()
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    value = float(f(ws, x))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
    print(json.dumps({"mode": mode, "argv": sys.argv[1:], "faults": faults, "value": value,
                      "tunables": os.environ.get("GLIBC_TUNABLES", "")}))
""")


def _run(tmp_path, mode):
    script = tmp_path / "prog.py"
    script.write_text(PROGRAM)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem._MARK)}
    env[hostmem.ENV] = mode
    out = subprocess.run([sys.executable, str(script), "--flag", "x y"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not USABLE, reason="needs Linux with glibc >= 2.35 and transparent huge pages")
def test_restart_applies_the_tunable_and_cuts_page_faults(tmp_path):
    tuned, plain = _run(tmp_path, "auto"), _run(tmp_path, "off")
    assert tuned["mode"] == "hugetlb" and tuned["tunables"] == hostmem.TUNABLE
    assert tuned["argv"] == ["--flag", "x y"]  # the same arguments after the restart
    assert plain["mode"] == "none" and plain["tunables"] == ""
    assert tuned["value"] == plain["value"]  # nothing computed changes
    # 2 MiB pages: far fewer faults for the same temporaries (measured: ~60x fewer)
    assert tuned["faults"] * 8 < plain["faults"], (tuned, plain)


@pytest.mark.skipif(hostmem._glibc_version() is None, reason="malloc_trim is glibc's")
def test_memory_is_trimmed_after_long_compilations(monkeypatch):
    import jax
    import jax.numpy as jnp

    calls = []
    monkeypatch.setattr(hostmem, "trim", lambda: calls.append(1) or True)
    monkeypatch.delenv(hostmem.ENV, raising=False)
    assert hostmem.trim_after_compiles() and hostmem.trim_after_compiles()  # registered once
    x = jnp.ones(7)
    monkeypatch.setattr(hostmem, "TRIM_AFTER_COMPILE_S", 0.0)
    jax.jit(lambda x: jnp.sin(x) * 3.25 + 0.5)(x).block_until_ready()  # one new program
    assert len(calls) == 1  # the listener saw the compilation event (its name is right)
    monkeypatch.setattr(hostmem, "TRIM_AFTER_COMPILE_S", 1e9)
    jax.jit(lambda x: jnp.cos(x) * 1.25)(x).block_until_ready()
    assert len(calls) == 1  # short compilations are not trimmed after
    monkeypatch.setenv(hostmem.ENV, "off")
    assert not hostmem.trim_after_compiles()
