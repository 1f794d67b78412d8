"""Structured outputs: a row's tokens constrained to JSON that matches a schema (OpenAI's
``response_format``), through llguidance (https://github.com/guidance-ai/llguidance).

    vocabulary = Vocabulary(tokenizer, eos_ids)          # once per tokenizer (about 1 s for 49k tokens)
    constraint = Constraint.for_response_format({"type": "json_object"}, vocabulary)   # None for text
    logits[~constraint.allowed(len(logits))] = -inf; token = sample(logits)
    constraint.accept(token); constraint.finished         # the JSON is complete

``Constraint.for_response_format`` checks the request (shape, size, every schema keyword) and
compiles the grammar once; each row then takes its own ``fork()``. llguidance computes the set of
allowed tokens lazily at each step (an Earley parser over the token trie), so a schema costs
nothing up front and the mask costs tens of microseconds per token (``docs/serving.md``).
"""

import json

import numpy as np
import torch

from .serving import RequestError

# Bounds on what a request may ask to compile (the server bounds every input).
MAX_SCHEMA_BYTES = 32 * 1024
MAX_SCHEMA_DEPTH = 32
# Between JSON tokens: one space, or a line break and an indentation (compact, spaced and
# pretty-printed JSON all fit), never a run of blank lines: with unbounded whitespace a model can
# pad its output until max_tokens runs out. A schema's "x-guidance" key overrides it.
WHITESPACE_PATTERN = r"\x20|\r?\n[\x20\x09]{0,32}"


class ResponseFormatError(RequestError):
    """A ``response_format`` that cannot be served: a bad shape, a schema too large, or a schema
    feature llguidance does not implement (its message names the keyword)."""

    def __init__(self, message):
        super().__init__(f"response_format: {message}", param="response_format")


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
        import llguidance.numpy
    except ImportError:
        raise ResponseFormatError(
            "structured outputs need the llguidance library, which is not installed; "
            "pip install 'ftengine[serve]' (or pip install llguidance)"
        ) from None
    return llguidance


class Vocabulary:
    """The tokenizer as llguidance sees it (every token's bytes, the EOS tokens); built once per
    tokenizer and shared by every constraint over it."""

    def __init__(self, tokenizer, eos_ids):
        llguidance = _llguidance()
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, eos_token=sorted(eos_ids))
        self.size = self.tokenizer.vocab_size


def schema_of(response_format):
    """The JSON schema a ``response_format`` asks for; ``None`` for plain text."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ResponseFormatError(f"expected an object such as {{'type': 'json_object'}}, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise ResponseFormatError(f"type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ResponseFormatError(
            "a 'json_schema' format needs 'json_schema': {'name': ..., 'schema': {...a JSON schema object...}}"
        )
    name = spec.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 64:
        raise ResponseFormatError("json_schema.name: give a name of 1 to 64 characters, as OpenAI requires")
    schema = spec["schema"]
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_BYTES:
        raise ResponseFormatError(f"json_schema.schema is {size} bytes of JSON; at most {MAX_SCHEMA_BYTES} are accepted")
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise ResponseFormatError(f"json_schema.schema nests deeper than {MAX_SCHEMA_DEPTH} levels; flatten it or use $defs")
    return schema


def _depth(value):
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return 1 + max((_depth(child) for child in children), default=0)


class Constraint:
    """One row's grammar state: which tokens may come next, advanced token by token."""

    def __init__(self, matcher, vocabulary):
        self._matcher, self._vocabulary = matcher, vocabulary
        self._bits = np.zeros((1, (vocabulary.size + 31) // 32), dtype=np.int32)

    @classmethod
    def for_response_format(cls, response_format, vocabulary):
        """A constraint for ``response_format`` (OpenAI's shapes), ``None`` for plain text;
        ``ResponseFormatError`` for a bad format or an unsupported schema, naming the problem."""
        schema = schema_of(response_format)
        if schema is None:
            return None
        llguidance = _llguidance()
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_pattern": WHITESPACE_PATTERN})
        except ValueError as exc:
            raise ResponseFormatError(f"the JSON schema is not valid: {exc}") from None
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, vocabulary.tokenizer)
        if failed:
            raise ResponseFormatError(
                f"the JSON schema uses what llguidance cannot enforce: {messages[0]}; remove or rewrite that part of the schema"
            )
        matcher = llguidance.LLMatcher(vocabulary.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ResponseFormatError(f"the JSON schema cannot be compiled: {matcher.get_error()}")
        return cls(matcher, vocabulary)

    def fork(self):
        """A fresh copy for another row (the grammar is compiled once)."""
        return Constraint(self._matcher.deep_copy(), self._vocabulary)

    def allowed(self, vocab_size):
        """A bool mask ``[vocab_size]`` of the tokens that keep the output valid (tokens past the
        tokenizer's vocabulary, the model's padding, never are)."""
        _llguidance().numpy.fill_next_token_bitmask(self._matcher, self._bits)
        self._check()
        allowed = np.unpackbits(self._bits.view(np.uint8), count=vocab_size, bitorder="little")
        return torch.from_numpy(allowed.view(np.bool_))

    def accept(self, token_id):
        """Advance past ``token_id``, which ``allowed`` allowed."""
        self._matcher.consume_token(token_id)
        self._check()

    @property
    def finished(self):
        """The output is complete: nothing but EOS may follow."""
        return self._matcher.is_stopped()

    def _check(self):
        if self._matcher.is_error():  # the mask allows only valid tokens: a bug, not bad input
            raise RuntimeError(f"structured output: llguidance failed: {self._matcher.get_error()}")
