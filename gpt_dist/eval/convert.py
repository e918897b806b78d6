"""Public task releases -> the built-in formats, with lm-evaluation-harness's prompts.

Each converter turns one row of a public release (the Hugging Face dataset's JSONL export)
into ``{"context", "choices", "label"}`` exactly as lm-eval's task YAML / ``utils.py`` builds
its requests, so the built-in task and lm-eval score the same strings:

* HellaSwag (``Rowan/hellaswag``: ``activity_label, ctx_a, ctx_b, endings, label``):
  ``lm_eval/tasks/hellaswag/utils.py`` ``preprocess`` (WikiHow bracket artifacts removed);
* PIQA (``goal, sol1, sol2, label``): ``"Question: {goal}\\nAnswer:"``;
* ARC (``allenai/ai2_arc``: ``question, choices {text, label}, answerKey``):
  ``"Question: {question}\\nAnswer:"``, label = position of ``answerKey``.

``wikitext_detokenizer`` is lm-eval's ``lm_eval/tasks/wikitext/preprocess_wikitext.py``
function (the wikitext task scores the detokenized page, counting words on the original).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag(d: dict[str, Any]) -> dict[str, Any]:
    ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
    return {"context": _hellaswag_preprocess(d["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_preprocess(e) for e in d["endings"]], "label": int(d["label"])}


def piqa(d: dict[str, Any]) -> dict[str, Any]:
    return {"context": f"Question: {d['goal']}\nAnswer:", "choices": [d["sol1"], d["sol2"]], "label": int(d["label"])}


def arc(d: dict[str, Any]) -> dict[str, Any]:
    ch = d["choices"]
    return {"context": f"Question: {d['question']}\nAnswer:", "choices": list(ch["text"]),
            "label": list(ch["label"]).index(d["answerKey"])}


CONVERTERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "hellaswag": hellaswag, "piqa": piqa, "arc_easy": arc, "arc_challenge": arc}


def wikitext_detokenizer(string: str) -> str:
    # contractions
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    # number separators
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    # punctuation
    for p in (":", ";", ".", "!", "?", ","):
        string = string.replace(f" {p} ", f"{p} ")
    # double brackets
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    # miscellaneous
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    return string.replace(" 's", "'s")
