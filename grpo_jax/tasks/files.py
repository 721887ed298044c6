"""GSM8K and MATH from local files (.jsonl or .parquet), and an optional hub loader.

Rows are JSON objects or parquet rows, never pickles. Every error names the file, and a bad row
names its 1-based line (jsonl) or row (parquet) number and the field at fault.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
from pathlib import Path
from typing import Any

from grpo_jax.tasks import Example, check_fraction, in_eval_split, register_task, stable_id

# (location such as "train.jsonl, line 3", row)
Rows = list[tuple[str, dict[str, Any]]]


def read_rows(path: str | Path) -> Rows:
    """All rows of a .jsonl or .parquet file, each with its location for error messages."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    if p.suffix == ".jsonl":
        rows: Rows = []
        with p.open(encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}, line {i}: invalid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    kind = type(row).__name__
                    raise ValueError(f"{p}, line {i}: expected a JSON object, got {kind}")
                rows.append((f"{p}, line {i}", row))
    elif p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq  # optional: only parquet users need it
        except ImportError:
            raise ImportError(f"reading {p} needs pyarrow: pip install pyarrow") from None
        rows = [(f"{p}, row {i}", r) for i, r in enumerate(pq.read_table(p).to_pylist(), start=1)]
    else:
        raise ValueError(f"{p}: unsupported file type {p.suffix!r}; expected .jsonl or .parquet")
    if not rows:
        raise ValueError(f"{p}: the dataset is empty (no rows)")
    return rows


def _field(where: str, row: dict[str, Any], name: str) -> str:
    if name not in row or row[name] is None:
        raise ValueError(f"{where}: missing field {name!r} (has {sorted(row)})")
    value = row[name]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def gsm8k_gold(solution: str) -> str | None:
    """The gold after GSM8K's final "#### ", thousands separators removed ("1,234" -> "1234")."""
    if "####" not in solution:
        return None
    gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return gold or None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces, escaped \\{ \\} skipped), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = start + len("\\boxed")
    if text[i : i + 1] == " ":  # "\boxed 5": the token up to whitespace or "$"
        rest = text[i + 1 :].lstrip()
        token = rest.split("$", 1)[0].split()
        return token[0] if token else None
    if text[i : i + 1] != "{":
        return None
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None


def gsm8k_examples(rows: Rows, name: str = "gsm8k") -> list[Example]:
    out = []
    for where, row in rows:
        question, solution = _field(where, row, "question"), _field(where, row, "answer")
        gold = gsm8k_gold(solution)
        if gold is None:
            raise ValueError(f"{where}: field 'answer' has no '#### <gold>' line")
        extra = {k: v for k, v in row.items() if k not in ("question", "answer")}
        out.append(extra | {"id": stable_id(name, question), "question": question,
                            "answer": gold, "solution": solution})
    return out


def math_examples(rows: Rows, name: str = "math") -> list[Example]:
    out = []
    for where, row in rows:
        question = _field(where, row, "problem")
        has_answer = row.get("answer") is not None
        solution = row.get("solution") if has_answer else _field(where, row, "solution")
        if has_answer:
            gold = str(row["answer"]).strip()
        else:
            gold = last_boxed(solution)
            if gold is None:
                raise ValueError(f"{where}: field 'solution' has no balanced \\boxed{{...}}")
        extra = {k: v for k, v in row.items() if k not in ("problem", "answer", "solution")}
        out.append(extra | {"id": stable_id(name, question), "question": question,
                            "answer": gold, "solution": solution})
    return out


def load_gsm8k(path: str | Path) -> list[Example]:
    """GSM8K rows {question, answer: "...#### 42"} -> examples with answer "42", solution text."""
    return gsm8k_examples(read_rows(path))


def load_math(path: str | Path) -> list[Example]:
    """MATH rows {problem, solution[, answer]} -> examples; gold = answer or the last \\boxed."""
    return math_examples(read_rows(path))


def load_hub(name: str, split: str, config: str | None = None) -> Rows:
    """Rows of a Hugging Face hub dataset (needs `datasets` and a network); feed them to
    gsm8k_examples / math_examples."""
    try:
        import datasets  # optional, and only useful online
    except ImportError:
        raise ImportError(
            "load_hub needs the `datasets` package (pip install datasets) and a network; "
            "offline, download the .jsonl/.parquet files and pass path=... instead"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, auth and missing-split errors all land here
        raise RuntimeError(
            f"could not load {name!r} (config {config!r}, split {split!r}) from the hub: {e}. "
            "Offline? download the files and pass path=... instead"
        ) from e
    rows = [(f"{name}[{split}], row {i}", dict(r)) for i, r in enumerate(ds, start=1)]
    if not rows:
        raise ValueError(f"{name}[{split}]: the dataset is empty")
    return rows


@dataclasses.dataclass(frozen=True, kw_only=True)
class FileTask:
    """A task over a training file and an optional eval file.

    Without eval_path, the held-out split is the problems whose question hashes below
    eval_fraction; train() never yields them. train(n, seed) walks seeded shuffles of the training
    set, epoch after epoch; eval(n) is the first n eval problems in file order.
    """

    name: str
    path: str
    eval_path: str | None = None
    eval_fraction: float = 0.1

    def __post_init__(self) -> None:
        check_fraction("eval_fraction", self.eval_fraction)

    def load(self, path: str) -> list[Example]:
        raise NotImplementedError

    @functools.cached_property
    def _splits(self) -> tuple[list[Example], list[Example]]:
        rows = self.load(self.path)
        if self.eval_path is not None:
            return rows, self.load(self.eval_path)
        train = [ex for ex in rows if not in_eval_split(ex["question"], self.eval_fraction)]
        held = [ex for ex in rows if in_eval_split(ex["question"], self.eval_fraction)]
        for split, exs in (("train", train), ("eval", held)):
            if not exs:
                raise ValueError(
                    f"{self.path}: the hash split (eval_fraction={self.eval_fraction}) left the "
                    f"{split} split empty; pass eval_path= or use a larger file"
                )
        return train, held

    def train(self, n: int, seed: int) -> list[Example]:
        data = self._splits[0]
        rng = random.Random(f"{self.name}:train:{seed}")
        out: list[Example] = []
        while len(out) < n:
            out.extend(rng.sample(data, len(data))[: n - len(out)])
        return [dict(ex) for ex in out]

    def eval(self, n: int | None = None) -> list[Example]:
        """The first n eval problems (n=None: all); asking for more than exist is an error."""
        data = self._splits[1]
        if n is not None and n > len(data):
            raise ValueError(f"{self.name}: asked for {n} eval problems, only {len(data)} exist")
        return [dict(ex) for ex in data[:n]]


@register_task("gsm8k")
@dataclasses.dataclass(frozen=True, kw_only=True)
class GSM8KTask(FileTask):
    name: str = "gsm8k"

    def load(self, path: str) -> list[Example]:
        return gsm8k_examples(read_rows(path), self.name)


@register_task("math")
@dataclasses.dataclass(frozen=True, kw_only=True)
class MathTask(FileTask):
    name: str = "math"

    def load(self, path: str) -> list[Example]:
        return math_examples(read_rows(path), self.name)
