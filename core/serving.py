"""Serve many adapters over one base model: each row of a batch names its own adapter.

    server = AdapterServer("models/base", {"support": "runs/a/final", "sales": "runs/b/final"})
    server.generate(["Hi!", "Hello"], adapters=["support", "sales"], max_tokens=32, temperature=0)
    for delta in server.stream(["Hi!"], adapters=["sales"], stop=["\\n"]):   # token streaming
        print(delta.text, end="")
    server.generate(["Hi!"], response_format={"type": "json_object"})     # output constrained to JSON
    server.load("tone", "runs/c/final"); server.unload("sales"); server.adapters

The base is built once (``ftengine.inference.load_for_inference``, ``plugins=["qlora"]`` for a
4-bit base) and no adapter is ever globally active: every forward first sets one adapter per
row (``AdapterMethod.set_rows``), so calls from several threads share the model safely,
one forward at a time. Generation is a sampling loop over the model's forward and its KV cache
(left padding, attention mask, position ids), since rows differ in sampling parameters and
stop strings; finished rows leave the batch at once. ``ftengine serve`` (``ftengine.server``)
puts an OpenAI-compatible HTTP server and a batching scheduler on top.
"""

import threading
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .adapters import check_adapter_name
from .data import encode_chat_text, render_prompt
from .errors import AdapterError, FtengineError
from .inference import build_for_inference, load_adapter, set_adapter
from .methods import adapter_methods, plugins_for_adapter
from .pluginmanager import active_names

if TYPE_CHECKING:
    from .structured import Constraint


class RequestError(FtengineError):
    """A bad generation request; ``param`` names the field and ``status`` is its HTTP status."""

    status = 400
    code = None

    def __init__(self, message, param=None):
        super().__init__(message)
        self.param = param


class UnknownModelError(RequestError):
    """A request names an adapter that is not loaded."""

    status = 404
    code = "model_not_found"


class ContextLengthError(RequestError):
    """The prompt plus ``max_tokens`` do not fit the model's context."""

    code = "context_length_exceeded"


@dataclass(frozen=True)
class SamplingParams:
    """How one row is generated; the defaults are OpenAI's (``temperature=0``: greedy)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: all tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        checks = [
            ("max_tokens", self.max_tokens, isinstance(self.max_tokens, int) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", self.temperature, 0 <= self.temperature <= 2, "between 0 and 2"),
            ("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k, isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0: off)"),
            (
                "stop",
                self.stop,
                all(isinstance(s, str) and s for s in self.stop) and len(self.stop) <= 4,
                "up to 4 non-empty strings",
            ),
        ]
        for name, value, ok, expected in checks:
            if not ok:
                raise RequestError(f"{name}: {value!r} is not valid; it must be {expected}", param=name)


@dataclass
class Delta:
    """New text of one row: ``finish_reason`` is ``"stop"`` or ``"length"`` on its last delta."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    row: "Row | None" = field(default=None, repr=False, compare=False)  # the row it belongs to


@dataclass
class Completion:
    """One row's whole result, with its token usage."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    adapter: str | None


@dataclass
class Row:
    """One sequence being generated. ``cancel()`` drops it from its batch at the next step
    (a client that went away), with finish reason ``"cancelled"``."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    index: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of text already returned in deltas
    finish_reason: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    constraint: "Constraint | None" = field(default=None, repr=False, compare=False)  # structured output

    def cancel(self):
        self.cancelled = True

    def completion(self):
        return Completion(self.text, self.token_ids, self.finish_reason, len(self.prompt_ids), len(self.token_ids), self.adapter)


class AdapterServer:
    """One base model and any number of named adapters, each request row naming its own.

    :param model_name: the base model (local directory, hub id, ``.gguf`` file or ``"default"``).
    :param adapters: ``{name: adapter directory}`` to load at once.
    :param plugins: more plugins to activate (``["qlora"]`` for a 4-bit base); the plugins an
        adapter needs are found from its ``adapter_config.json``.
    :param sections: config sections for the plugins (``{"qlora": {"blocksize": 64}}``).
    :param max_batch_size: rows per forward; longer calls run in several batches.
    :param strict: refuse adapters trained on another base model (default: warn), at start and
        in ``load``.
    """

    def __init__(self, model_name, adapters=None, plugins=(), sections=None, max_batch_size=16, strict=False):
        adapters = dict(adapters or {})
        self.strict = strict
        self.model, self.tokenizer, self.pm, self._config = build_for_inference(model_name, adapters, plugins, sections, strict)
        set_adapter(self.model, self.pm, None)  # rows name their adapters; none is active
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self._adapters = {name: Path(path) for name, path in adapters.items()}
        self._lock = threading.RLock()  # one forward (or load/unload) at a time
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer is not safe across threads
        self._rows_set = None
        self._in_use = {}  # adapter name -> rows generating with it
        self.device = next(self.model.parameters()).device
        self.context_length = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.eos_ids = model_eos_ids(self.model, self.tokenizer)
        self._cache_argument = kv_cache_argument(self.model)
        self._vocabulary = None  # ftengine.structured.Vocabulary, built at the first response_format
        if adapters:  # an adapter that cannot share a batch (prompt tuning) is refused now
            try:
                self._set_rows(list(adapters))
            finally:
                self._set_rows(None)

    # ----------------------------------------------------------------------------------------
    # adapters
    # ----------------------------------------------------------------------------------------

    @property
    def adapters(self):
        """``{name: directory}`` of the loaded adapters, in load order."""
        return dict(self._adapters)

    def load(self, name, path):
        """Load the adapter directory ``path`` under ``name``; a bad adapter leaves the server as
        it was (``AdapterError`` naming the problem)."""
        path = Path(path)
        check_adapter_name(name, self._adapters, path)
        missing = [p for p in plugins_for_adapter(path) if p not in active_names(self.pm)]
        if missing:
            raise AdapterError(
                f"{path}: this adapter needs the plugin(s) {', '.join(missing)}, which the server was not started with; "
                f"restart it with {' '.join(f'--plugin {p}' for p in missing)}"
            )
        with self._lock:
            self.model = load_adapter(self.model, self._config, self.pm, name, path, self.strict)
            self.model.requires_grad_(False)
            self.model.eval()
            set_adapter(self.model, self.pm, None)
            self._adapters[name] = path
            self._rows_set = None
            try:  # an adapter that cannot share a batch is refused now, not at its first request
                self._set_rows([name])
            except AdapterError:
                self._remove(name)
                raise
            finally:
                self._set_rows(None)

    def unload(self, name):
        """Remove adapter ``name``; refused while a request is generating with it."""
        with self._lock:
            if name not in self._adapters:
                raise UnknownModelError(f"no adapter named '{name}' is loaded (loaded: {', '.join(self._adapters) or 'none'})")
            if self._in_use.get(name):
                raise AdapterError(
                    f"adapter '{name}' is generating for {self._in_use[name]} request row(s); unload it when they finish"
                )
            self._remove(name)

    def _remove(self, name):
        adapter_methods(self.pm).delete(self.model, name)
        self._adapters.pop(name, None)
        self._rows_set = None

    def _set_rows(self, names):
        names = None if names is None else tuple(names)
        if names == self._rows_set:
            return
        self._rows_set = None
        try:
            adapter_methods(self.pm).set_rows(self.model, None if names is None else list(names))
        except Exception:
            adapter_methods(self.pm).set_rows(self.model, None)
            raise
        self._rows_set = names

    def check_adapter(self, name):
        """Raise ``UnknownModelError`` unless ``name`` is ``None`` or a loaded adapter."""
        if name is not None and name not in self._adapters:
            raise UnknownModelError(
                f"the model '{name}' does not exist: load it first (loaded adapters: {', '.join(self._adapters) or 'none'})",
                param="model",
            )

    # ----------------------------------------------------------------------------------------
    # prompts
    # ----------------------------------------------------------------------------------------

    def encode(self, prompt, chat=False):
        """Token ids of ``prompt``: text, token ids, or (``chat=True``) a list of messages
        rendered with the tokenizer's chat template."""
        if chat:
            if not self.tokenizer.chat_template:
                raise RequestError(
                    "messages: this model's tokenizer has no chat template; use the completions endpoint", "messages"
                )
            with self._tokenizer_lock:
                return encode_chat_text(self.tokenizer, render_prompt(self.tokenizer, prompt))["input_ids"]
        if isinstance(prompt, str):
            with self._tokenizer_lock:
                return self.tokenizer(prompt)["input_ids"]
        if not all(isinstance(t, int) and 0 <= t < len(self.tokenizer) for t in prompt):
            raise RequestError("prompt: token ids must be integers within the vocabulary", "prompt")
        return list(prompt)

    def constraint(self, response_format):
        """The compiled ``ftengine.structured.Constraint`` for ``response_format`` (OpenAI's
        shapes), ``None`` for plain text; ``ResponseFormatError`` (a ``RequestError``) for a bad
        format or a schema feature the library cannot enforce. Give it to ``row``."""
        from .structured import Constraint, Vocabulary, schema_of

        if schema_of(response_format) is None:
            return None
        with self._tokenizer_lock:
            if self._vocabulary is None:
                self._vocabulary = Vocabulary(self.tokenizer, self.eos_ids)
        return Constraint.for_response_format(response_format, self._vocabulary)

    def row(self, prompt_ids, adapter, params, index=0, constraint=None):
        """A ``Row`` for ``run``, checked: the adapter is loaded and the prompt fits; with a
        ``constraint`` (from ``constraint()``), the row gets its own copy of it."""
        self.check_adapter(adapter)
        if not prompt_ids:
            raise RequestError("prompt: empty; give at least one token", "prompt")
        if len(prompt_ids) + params.max_tokens > self.context_length:
            raise ContextLengthError(
                f"this model's context is {self.context_length} tokens, but the prompt has {len(prompt_ids)} and max_tokens is "
                f"{params.max_tokens}; shorten the prompt or lower max_tokens",
                "max_tokens" if len(prompt_ids) < self.context_length else "prompt",
            )
        generator = torch.Generator(device=self.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        constraint = constraint.fork() if constraint is not None else None
        return Row(list(prompt_ids), adapter, params, index=index, generator=generator, constraint=constraint)

    # ----------------------------------------------------------------------------------------
    # generation
    # ----------------------------------------------------------------------------------------

    def generate(self, prompts, adapters=None, response_format=None, **params) -> list[Completion]:
        """Completions of ``prompts`` (a string or a list; token id lists too), row ``i`` with
        adapter ``adapters[i]`` (a single name or ``None`` for all rows).

        :param response_format: OpenAI's: ``{"type": "json_object"}`` or ``{"type":
            "json_schema", "json_schema": {"name": ..., "schema": {...}}}`` constrains every row
            to JSON (matching the schema); ``None`` or ``{"type": "text"}``: free text.
        :param params: ``SamplingParams`` fields: ``max_tokens``, ``temperature`` (0: greedy),
            ``top_p``, ``top_k``, ``seed``, ``stop``.
        """
        rows = self._rows(prompts, adapters, params, response_format)
        for _ in self._run_all(rows):
            pass
        return [row.completion() for row in rows]

    def stream(self, prompts, adapters=None, response_format=None, **params) -> Iterator[Delta]:
        """Like ``generate``, but yields each row's new text as it is generated (``Delta``s;
        a row's last one carries its finish reason)."""
        return self._run_all(self._rows(prompts, adapters, params, response_format))

    def _rows(self, prompts, adapters, params, response_format):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if adapters is None or isinstance(adapters, str):
            adapters = [adapters] * len(prompts)
        if len(adapters) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(adapters)} adapters: give one adapter per prompt", "adapters")
        sampling = SamplingParams(**params)
        constraint = self.constraint(response_format)
        return [
            self.row(self.encode(p), a, sampling, index=i, constraint=constraint)
            for i, (p, a) in enumerate(zip(prompts, adapters))
        ]

    def _run_all(self, rows):
        for start in range(0, len(rows), self.max_batch_size):
            for deltas in self.run(rows[start : start + self.max_batch_size]):
                yield from deltas

    @torch.no_grad()
    def run(self, rows) -> Iterator[list[Delta]]:
        """Generate ``rows`` as one batch, one step at a time: yield the deltas of each step.

        Every step sets the rows' adapters and runs one forward under the server's lock, so
        several ``run`` s (the HTTP scheduler's batches, other threads) interleave safely.
        """
        with self._lock:
            for row in rows:
                self._in_use[row.adapter] = self._in_use.get(row.adapter, 0) + 1
        try:
            yield from self._run(rows)
        finally:
            with self._lock:
                for row in rows:
                    self._in_use[row.adapter] -= 1
                self._set_rows(None)  # the model answers plain forwards again

    def _run(self, rows):
        return sample_rows(
            self._forward, rows, self.tokenizer, self.eos_ids, self._cache_argument, self.device, self._tokenizer_lock
        )

    def _forward(self, live, inputs):
        with self._lock:
            self._set_rows([r.adapter for r in live])
            return self.model(**inputs)


# --------------------------------------------------------------------------------------------
# the sampling loop
# --------------------------------------------------------------------------------------------


def generate_rows(model, tokenizer, rows):
    """Generate ``rows`` (``Row`` s, each with its own ``SamplingParams`` and seeded
    ``generator``) as one batch with ``model`` as it is (its active adapter, its mode); return
    them, finished: ``token_ids`` (the EOS that ended a row included) and ``text`` (cut at a
    stop string). Call it under ``torch.no_grad``. Training-time sampling (``grpo``) uses it."""
    device = next(model.parameters()).device
    for _ in sample_rows(
        lambda live, inputs: model(**inputs), rows, tokenizer, model_eos_ids(model, tokenizer), kv_cache_argument(model), device
    ):
        pass
    return rows


def sample_rows(forward, rows, tokenizer, eos_ids, cache_argument, device, tokenizer_lock=None):
    """Generate ``rows`` as one batch, one token per step: yield the deltas of each step.

    Prompts are left-padded, with an attention mask and position ids; the KV cache keeps the
    past, and a finished row leaves the batch (and the cache) at once.

    :param forward: ``forward(live_rows, inputs) -> output``: the model's forward over
        ``inputs`` for the rows still generating (the server sets their adapters first).
    :param eos_ids: the token ids that end a row.
    :param cache_argument: the forward's KV-cache argument (``kv_cache_argument``).
    :param tokenizer_lock: held while decoding (a fast tokenizer is not safe across threads).
    """
    tokenizer_lock = tokenizer_lock or nullcontext()
    live = list(rows)
    width = max(len(r.prompt_ids) for r in live)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in live], device=device)
    mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in live], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = _new_cache()
    while live:
        inputs = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": positions,
            "use_cache": True,
            "logits_to_keep": 1,
            cache_argument: cache,
        }
        output = forward(live, inputs)
        logits = output.logits[:, -1].float()
        cache = output[cache_argument]
        deltas, keep, tokens = [], [], []
        for i, row in enumerate(live):
            if row.cancelled:
                row.finish_reason = "cancelled"
                continue
            allowed = row.constraint.allowed(logits.shape[-1]) if row.constraint is not None else None
            token = _sample(logits[i], row.params, row.generator, allowed)
            delta = _advance(row, token, tokenizer, eos_ids, tokenizer_lock)
            if delta.text or delta.finish_reason:
                deltas.append(delta)
            if row.finish_reason is None:
                keep.append(i)
                tokens.append(token)
        yield deltas
        if len(keep) < len(live):
            if not keep:
                break
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            live = [live[i] for i in keep]
            mask, positions = mask[index], positions[index]
        input_ids = torch.tensor(tokens, device=device).unsqueeze(1)
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        positions = positions[:, -1:] + 1


def _advance(row, token, tokenizer, eos_ids, tokenizer_lock):
    """Append ``token`` to ``row``: stop at EOS, a stop string, the end of its constrained
    output or ``max_tokens``; return the text that is now safe to show (held back while it
    may be the start of a stop string). A constrained row ignores stop strings, which could
    cut its JSON short: it ends when the JSON is complete."""
    params = row.params
    row.token_ids.append(token)
    if row.constraint is not None:
        row.constraint.accept(token)
    stops = params.stop if row.constraint is None else ()
    if token in eos_ids:
        row.finish_reason = "stop"
    else:
        with tokenizer_lock:
            text = tokenizer.decode(row.token_ids, skip_special_tokens=True)
        found = _find_stop(text, stops, max(0, len(row.text) - max((len(s) for s in stops), default=0)))
        if found is not None:
            text, row.finish_reason = text[:found], "stop"
        row.text = text
    if row.finish_reason is None and row.constraint is not None and row.constraint.finished:
        row.finish_reason = "stop"
    if row.finish_reason is None and len(row.token_ids) >= params.max_tokens:
        row.finish_reason = "length"
    held = _held_back(row.text, stops) if row.finish_reason is None else 0
    safe = len(row.text) - held
    start, row.emitted = row.emitted, max(row.emitted, safe)
    return Delta(row.index, row.text[start : row.emitted], [token], row.finish_reason, row)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _new_cache():
    from transformers import DynamicCache

    return DynamicCache()


def kv_cache_argument(model):
    """The forward's KV-cache argument: ``cache`` in newer transformers, ``past_key_values``
    before (the output field has the same name)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def model_eos_ids(model, tokenizer):
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids |= set(value if isinstance(value, list | tuple) else [value] if value is not None else [])
    return ids


def _sample(logits, params, generator, allowed=None):
    """The next token from one row's logits ``[vocab]``: only ``allowed`` tokens (a bool mask,
    a structured output's) if given, then greedy at temperature 0, otherwise top-k, then top-p
    (nucleus), then a draw from the row's own generator."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def _find_stop(text, stops, start):
    """The index in ``text`` (searching from ``start``) where the first stop string begins."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text, stops):
    """Characters at the end of ``text`` not to show yet: an incomplete UTF-8 character, or
    the longest tail that begins a stop string."""
    held = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if stop.startswith(text[-n:]):
                held = max(held, n)
                break
    return held
