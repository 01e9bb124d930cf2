"""Hashes of model code: the identity of a model in the zoo.

Why two: `code_hash` (ours) is the sha256 of the code normalized through Python's own tokenizer, so
whitespace, comments and blank lines do not make a new model, but a changed identifier or literal
does. `lemur_id` is LEMUR's nn_id (md5 of the code with all whitespace removed), kept so that imported
LEMUR data and NNGPT-style dedup checks keep working.
"""

from __future__ import annotations

import hashlib
import io
import re
import tokenize

_SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
         tokenize.ENCODING, tokenize.ENDMARKER}


def normalize_code(code: str) -> str:
    """Token stream without comments or layout; falls back to whitespace-collapsing on bad syntax."""
    try:
        tokens = tokenize.generate_tokens(io.StringIO(code).readline)
        parts: list[str] = []
        depth_marks: list[str] = []
        for tok in tokens:
            if tok.type in (tokenize.INDENT, tokenize.DEDENT):
                depth_marks.append(">" if tok.type == tokenize.INDENT else "<")
                parts.append(depth_marks[-1])
                continue
            if tok.type == tokenize.NEWLINE:
                parts.append(";")
                continue
            if tok.type in _SKIP:
                continue
            parts.append(tok.string)
        return " ".join(parts)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return re.sub(r"\s+", " ", code).strip()


def code_hash(code: str) -> str:
    return hashlib.sha256(normalize_code(code).encode()).hexdigest()


def lemur_id(code: str) -> str:
    """LEMUR's `uuid4(code)`: md5 of the code with every whitespace character removed."""
    return hashlib.md5(re.sub(r"\s", "", code).encode()).hexdigest()


def model_name(prefix: str | None, code: str) -> str:
    """A new model's name, LEMUR's rule: `lemur_id(code)`, as `{prefix}-{lemur_id}` when a prefix is given.

    Why LEMUR's md5 and not our `code_hash`: NNGPT-style loops compare the name `check_nn` returns (and
    `data()`'s nn_id) with LEMUR's own; the model's identity for reuse stays `code_hash`."""
    digest = lemur_id(code)
    return f"{prefix}-{digest}" if prefix else digest
