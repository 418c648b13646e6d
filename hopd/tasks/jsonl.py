"""Prompt sets from JSONL files (and Hugging Face datasets saved to disk), and math answer checks.

Each row needs a prompt and, for accuracy, a reference answer (a file without one is free text,
measured by KL and teacher NLL instead):
- the prompt is a string field (`prompt`, or `question` as in GSM8K) or a chat `messages` list
  (the user turns; a trailing assistant turn, if any, is dropped from the prompt);
- the answer is a string or number field (`answer`); a GSM8K answer ("...#### 42") is reduced to
  what follows `####`.
Field names can be given explicitly; otherwise they are detected from the first row.

Every problem is reported with the file and line: invalid UTF-8, invalid JSON, a row that is not an
object, a missing or empty field, a field of the wrong type, an empty file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from hopd.config import ConfigError

PROMPT_FIELDS = ("prompt", "question", "messages", "problem")
ANSWER_FIELDS = ("answer", "solution", "target")


class DataError(ConfigError):
    """A bad prompt file: the message names the file, the line and the fix."""


def _rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.exists():
        raise DataError(f"prompt file {path} not found")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise DataError(f"prompt file {path} is not a regular file (a pipe, socket or device?): "
                        "save the prompts to a JSONL file and give its path")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark is accepted and dropped
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start}); save the file as "
                        "UTF-8") from None
    rows = []
    # lines end at \n only: JSON strings may hold U+2028 and other characters that
    # str.splitlines() would also split at (json.dumps(ensure_ascii=False) writes them raw)
    for i, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno}); each line "
                            "must be one JSON object") from None
        except RecursionError:
            raise DataError(f"{path}:{i}: nested too deeply to read; a row is an object of "
                            "strings (or chat messages)") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        rows.append((i, row))
    if not rows:
        raise DataError(f"{path}: the file has no rows; give a JSONL file with one object per line")
    return rows


def _load_disk_dataset(path: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} looks like a saved Hugging Face dataset; install the "
                        "`datasets` package to read it, or export it to JSONL") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    rows = [(i + 1, dict(r)) for i, r in enumerate(ds)]
    if not rows:
        raise DataError(f"{path}: the dataset has no rows")
    return rows


def detect_fields(row: dict[str, Any], prompt_field: str, answer_field: str, where: str
                  ) -> tuple[str, str]:
    pf = prompt_field or next((f for f in PROMPT_FIELDS if f in row), "")
    af = answer_field or next((f for f in ANSWER_FIELDS if f in row), "")
    if not pf:
        raise DataError(f"{where}: no prompt field; rows need one of {', '.join(PROMPT_FIELDS)} "
                        f"(found {', '.join(row) or 'no fields'}), or set data_prompt_field")
    return pf, af  # af "": no reference answers (free text: measured by KL, not accuracy)


def _prompt_of(row: dict[str, Any], field: str, where: str) -> str | list[dict[str, str]]:
    if field not in row:
        raise DataError(f"{where}: missing field '{field}'")
    value = row[field]
    if isinstance(value, list):
        msgs = []
        for j, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: '{field}[{j}]' must be an object with string 'role' "
                                "and 'content'")
            msgs.append({"role": m["role"], "content": m["content"]})
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        if not msgs:
            raise DataError(f"{where}: '{field}' has no user turn")
        return msgs
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string or a list of chat messages, "
                        f"got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{field}' is empty")
    return value


def _answer_of(row: dict[str, Any], field: str, where: str) -> str:
    if field not in row:
        raise DataError(f"{where}: missing field '{field}'")
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field '{field}' must be a string or a number, got "
                        f"{type(value).__name__}")
    text = str(value)
    if "####" in text:  # GSM8K: worked solution, then "#### final"
        text = text.rsplit("####", 1)[1]
    elif last_boxed(text) is not None:  # MATH-style solution: the last \\boxed{...}
        text = str(last_boxed(text))
    text = text.strip()
    if not text:
        raise DataError(f"{where}: field '{field}' is empty")
    return text


def load_rows(path: str | Path, prompt_field: str = "", answer_field: str = ""
              ) -> list[tuple[str | list[dict[str, str]], str]]:
    """(prompt, answer) pairs of a JSONL file or a saved dataset folder, validated."""
    return [(p, a) for p, a, _ in load_located_rows(path, prompt_field, answer_field)]


def load_located_rows(path: str | Path, prompt_field: str = "", answer_field: str = ""
                      ) -> list[tuple[str | list[dict[str, str]], str, str]]:
    """(prompt, answer, "FILE:LINE") triples of a JSONL file or a saved dataset folder."""
    path = Path(path)
    rows = _load_disk_dataset(path) if path.is_dir() else _rows(path)
    first_line, first = rows[0]
    pf, af = detect_fields(first, prompt_field, answer_field, f"{path}:{first_line}")
    return [(_prompt_of(r, pf, f"{path}:{i}"), _answer_of(r, af, f"{path}:{i}") if af else "",
             f"{path}:{i}") for i, r in rows]


def looks_like_final_answer(answer: str) -> bool:
    """A number, or a short expression without spaces: what a checker can compare exactly."""
    s = normalize(answer)
    try:
        float(s)
        return True
    except ValueError:
        return len(s) <= 40 and len(answer.split()) <= 3


# ---------------------------------------------------------------------------------------------
# Answer extraction for math-style responses

_BOXED = "\\boxed{"


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    i, depth = start + len(_BOXED), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unclosed: the response was cut


_HASH = re.compile(r"####\s*([^\n]+)")
_ANSWER = re.compile(r"Answer:\s*([^\n]+?)\s*$")


def extract_math_answer(text: str) -> str | None:
    """\\boxed{...}, then '#### ...', then a final 'Answer: ...' line; None if none."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    m = _HASH.findall(text)
    if m:
        return m[-1]
    m2 = _ANSWER.search(text)
    return m2.group(1) if m2 else None


def normalize(ans: str) -> str:
    s = ans.strip().strip("$").replace(",", "").replace(" ", "")
    s = s.removeprefix("\\text{").removesuffix("}") if s.startswith("\\text{") else s
    try:
        f = float(s)
        return str(int(f)) if f.is_integer() else str(f)
    except ValueError:
        return s


def math_correct(response: str, answer: str) -> bool:
    """Exact match after normalisation; `math-verify` decides when it is installed."""
    got = extract_math_answer(response)
    if got is None:
        return False
    if normalize(got) == normalize(answer):
        return True
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    try:
        return bool(verify(parse(f"${answer}$"), parse(f"${got}$")))
    except Exception:  # math-verify raises on unparsable text; treat as not equal
        return False
