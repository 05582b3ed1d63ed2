"""Per-benchmark prompt formatting, the same table as the original wrapper (and nanoVLM's).

A task's context (what lmms-eval's `doc_to_text` produced) becomes the user message: a user prefix is put
in front, text replacements are applied (in table order), a user suffix is appended. The assistant prefix
(e.g. "Answer:") is written after the assistant header, so the model continues from it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskFormat:
    replacements: tuple[tuple[str, str], ...] = ()
    user_prefix: str = ""
    user_suffix: str = ""
    assistant_prefix: str = ""


@dataclass
class FormattedPrompt:
    user_text: str
    assistant_prefix: str = ""


_MULTIPLE_CHOICE = TaskFormat(
    replacements=(
        ("\nOptions:", "\nChoices:"),
        ("\nA. ", "\nChoices:\nA. "),
        ("Please select the correct answer from the options above.", "Answer with the letter."),
        ("Answer with the option's letter from the given choices directly", "Answer with the letter directly"),
    ),
    assistant_prefix="Answer:",
)
_DOCVQA = TaskFormat(
    user_prefix="Give a short and terse answer to the following question. Do not paraphrase or reformat the text "
    "you see in the image. Do not include any full stops. Just give the answer without additional explanation. "
    "Question: "
)
_CHARTQA = TaskFormat(
    user_prefix="For the question below, follow the following instructions:\n"
    "-The answer should contain as few words as possible.\n"
    "-Don't paraphrase or reformat the text you see in the image.\n"
    "-Answer a binary question with Yes or No.\n"
    "-When asked to give a numerical value, provide a number like 2 instead of Two.\n"
    "-If the final answer has two or more items, provide it in the list format like [1, 2].\n"
    "-When asked to give a ratio, give out the decimal value like 0.25 instead of 1:4.\n"
    "-When asked to give a percentage, give out the whole value like 17 instead of decimal like 0.17%.\n"
    "-Don't include any units in the answer.\n"
    "-Do not include any full stops at the end of the answer.\n"
    "-Try to include the full label from the graph when asked about an entity.\n"
    "Question: "
)
_TEXTVQA = TaskFormat(
    user_prefix="Answer the following question about the image using as few words as possible. Follow these "
    "additional instructions:\n"
    "-Always answer a binary question with Yes or No.\n"
    "-When asked what time it is, reply with the time seen in the image.\n"
    "-Do not put any full stops at the end of the answer.\n"
    "-Do not put quotation marks around the answer.\n"
    "-An answer with one or two words is favorable.\n"
    "-Do not apply common sense knowledge. The answer can be found in the image.\n"
    "Question: "
)
_MMMU = TaskFormat(
    replacements=(
        ("Question:", ""),
        ("Answer with the option's letter from the given choices directly.", "Answer with the letter directly."),
        ("\nA. ", "\nChoices:\nA. "),
    ),
    assistant_prefix="Answer:",
)
_BRIEF = TaskFormat(user_suffix="\nGive a very brief answer.")

TASK_FORMATS: dict[str, TaskFormat] = {
    **dict.fromkeys(("ai2d", "mmstar", "seedbench", "scienceqa"), _MULTIPLE_CHOICE),
    **dict.fromkeys(("docvqa_val", "docvqa_test"), _DOCVQA),
    "chartvqa": _CHARTQA,  # the original's key (lmms-eval's task is "chartqa", which it never matched)
    **dict.fromkeys(("textvqa_val", "textvqa_test"), _TEXTVQA),
    **dict.fromkeys(("mmmu_val", "mmmu_test"), _MMMU),
    **dict.fromkeys(("infovqa_val", "mme", "ocrbench"), _BRIEF),
}
PLAIN = TaskFormat()


def task_format(task: str | None) -> TaskFormat:
    """The formatting of `task` (exact name as in the original's table); other tasks are left as they are."""
    return TASK_FORMATS.get(task or "", PLAIN)


def format_prompt(context: str, task: str | None) -> FormattedPrompt:
    """lmms-eval context -> (user message, assistant prefix), in the original's order of operations."""
    fmt = task_format(task)
    text = fmt.user_prefix + context
    for old, new in fmt.replacements:
        text = text.replace(old, new)
    return FormattedPrompt(text + fmt.user_suffix, fmt.assistant_prefix)
