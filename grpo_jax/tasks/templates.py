"""Prompt templates: the R1-Zero template for base models, the tokenizer's chat template for
instruct models, or the bare question."""

from __future__ import annotations

from typing import Any, Literal

# DeepSeek-R1, Table 1, verbatim.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)

# The instruction part of the R1-Zero template, for use as a chat system prompt so that an
# instruct model is told about the tags the format reward looks for.
R1_SYSTEM_PROMPT = R1_ZERO_TEMPLATE.split(" User:")[0]

# The tiny CPU experiments' compact stand-in: the same User/Assistant turn without the long
# instruction (a character-level model would spend ~400 tokens on it). The completion format is
# the R1 one, <think> ... </think> <answer> ... </answer>.
SHORT_TEMPLATE = "User: {prompt} Assistant:"

TemplateName = Literal["r1_zero", "chat", "chat_r1", "plain", "short"]
TEMPLATES: tuple[str, ...] = ("r1_zero", "chat", "chat_r1", "plain", "short")


def r1_zero_prompt(question: str) -> str:
    """The R1-Zero prompt for `question`.

    The template appends "." after the question, so one trailing "." of the question is dropped
    to avoid "..".
    """
    q = question.strip()
    if q.endswith(".") and not q.endswith(".."):
        q = q[:-1]
    return R1_ZERO_TEMPLATE.format(prompt=q)


def chat_prompt(
    tokenizer: Any, question: str, system: str | None = None, add_think: bool = False
) -> str:
    """The tokenizer's chat template applied to one user turn, ending with the assistant header.

    add_think: pre-fill "<think>\\n" after the header (the model then starts inside its reasoning;
    a format reward must then not require the opening tag in the completion).
    """
    if getattr(tokenizer, "chat_template", None) is None:  # duck-typed tokenizers lack it
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name!r} has no chat template; use template='r1_zero' or 'plain' for a "
            "base model, or set tokenizer.chat_template"
        )
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": question})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text + "<think>\n" if add_think else text


def format_prompt(
    example: dict[str, Any],
    template: TemplateName,
    tokenizer: Any = None,
    *,
    system: str | None = None,
    add_think: bool = False,
) -> str:
    """The prompt text for an example under `template` ("r1_zero", "chat", "chat_r1", "plain" or
    "short")."""
    question = example["question"]
    if template == "r1_zero":
        return r1_zero_prompt(question)
    if template == "plain":
        return question
    if template == "short":
        return SHORT_TEMPLATE.format(prompt=question.strip())
    if template in ("chat", "chat_r1"):
        if tokenizer is None:
            raise ValueError(f"template={template!r} needs a tokenizer")
        # chat_r1: the R1 instruction (think/answer tags) as the system message, so that an
        # instruct model is told the format the format reward checks.
        if template == "chat_r1" and system is None:
            system = R1_SYSTEM_PROMPT
        return chat_prompt(tokenizer, question, system=system, add_think=add_think)
    raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
