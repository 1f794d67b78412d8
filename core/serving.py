"""Serve many adapters over one base model: each row of a batch names its own adapter.

    server = AdapterServer("models/base", {"support": "runs/a/final", "sales": "runs/b/final"})
    server.generate(["Hi!", "Hello"], adapters=["support", "sales"], max_tokens=32, temperature=0)
    for delta in server.stream(["Hi!"], adapters=["sales"], stop=["\\n"]):   # token streaming
        print(delta.text, end="")
    server.generate(["Hi!"], response_format={"type": "json_object"})     # output constrained to JSON
    server.load("tone", "runs/c/final"); server.unload("sales"); server.adapters
    AdapterServer("models/base", adapter_dir="adapters/", max_loaded_adapters=4)   # by folder name, on demand

The base is built once (``ftengine.inference.load_for_inference``, ``plugins=["qlora"]`` for a
4-bit base) and no adapter is ever globally active: every forward first sets one adapter per
row (``AdapterMethod.set_rows``), so calls from several threads share the model safely,
one forward at a time. Generation is a sampling loop over the model's forward and its KV cache
(left padding, attention mask, position ids), since rows differ in sampling parameters and
stop strings: a ``Batch`` admits rows at any step and retires each the moment it finishes
(continuous batching). ``ftengine serve`` (``ftengine.server``) puts an OpenAI-compatible HTTP
server and its scheduler on top.

With ``adapter_dir``, every folder of it is an adapter served by its folder name, loaded on its
first request; beyond ``max_loaded_adapters`` of them, the least recently used one that no
request holds is evicted. A request holds its adapters (``acquire`` ... ``release``) from
before it queues until its rows leave the engine, so neither eviction nor ``unload`` can take
an adapter from under it.
"""

import collections
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .adapters import CONFIG_FILE, adapter_name_problem, check_adapter_name
from .data import encode_chat_text, render_prompt
from .errors import AdapterError, FtengineError
from .inference import build_for_inference, load_adapter, set_adapter
from .methods import adapter_methods, plugins_for_adapter
from .pluginmanager import active_names

if TYPE_CHECKING:
    from .structured import Constraint

TOKENS_PER_S_WINDOW_S = 10
COUNTERS = (
    "steps",  # scheduling steps: a prefill of the rows admitted since, then one decode
    "forwards",
    "generated_tokens",
    "rows_admitted",
    "rows_admitted_mid_batch",  # admitted while other rows were decoding
    "running_rows",
    "cancelled_rows",
    "failed_rows",
)


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


class GenerationError(RequestError):
    """One row failed while it generated (its logits are not finite, its sampling failed); the
    other rows of its batch go on."""

    status = 500
    code = "generation_failed"


# Below these, float32 sampling breaks (logits / temperature overflow; top_p rounds to 0).
MIN_TEMPERATURE = 1e-3
MIN_TOP_P = 1e-6


class AdapterInUseError(RequestError):
    """An adapter cannot be unloaded while requests hold it."""

    status = 409
    code = "adapter_in_use"


class AdaptersBusyError(RequestError):
    """Every loaded on-demand adapter is held by in-flight requests for longer than the wait."""

    status = 503
    code = "adapters_busy"


def check_text(text, param):
    """Raise ``RequestError`` for text no tokenizer takes: a lone surrogate (JSON's ``"\\ud800"``
    decodes to one), which has no UTF-8 encoding."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(
            f"{param}: the text holds a lone surrogate ({text[exc.start]!r} at character {exc.start}), which is not "
            f"Unicode text; send valid UTF-8",
            param,
        ) from None


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
            (
                "temperature",
                self.temperature,
                self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= 2,
                f"0 (greedy) or between {MIN_TEMPERATURE} and 2",
            ),
            ("top_p", self.top_p, MIN_TOP_P <= self.top_p <= 1, f"between {MIN_TOP_P} and 1"),
            ("top_k", self.top_k, isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0: off)"),
            (
                "seed",
                self.seed,
                self.seed is None or (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**64),
                "an integer from -2**63 to 2**64 - 1 (what a generator takes)",
            ),
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
    (a client that went away), with finish reason ``"cancelled"``; a row that failed alone has
    finish reason ``"error"`` and its ``error``."""

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
    error: Exception | None = None
    constraint: "Constraint | None" = field(default=None, repr=False, compare=False)  # structured output

    def cancel(self):
        self.cancelled = True

    def fail(self, error):
        self.error, self.finish_reason = error, "error"

    def completion(self):
        return Completion(self.text, self.token_ids, self.finish_reason, len(self.prompt_ids), len(self.token_ids), self.adapter)


class Engine:
    """A model and its tokenizer generating ``Row`` s in ``Batch`` es, the model as it is (its
    active adapter, its mode): what ``generate_rows`` samples with at training time.
    ``AdapterServer`` is one, which sets one adapter per row and serialises forwards."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.eos_ids = model_eos_ids(model, tokenizer)
        self._cache_argument = kv_cache_argument(model)
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer is not safe across threads
        self._stats_lock = threading.Lock()
        self._counters = dict.fromkeys(COUNTERS, 0)

    def batch(self):
        """A new, empty ``Batch``: admit rows into it at any step (continuous batching)."""
        return Batch(self)

    def run(self, rows) -> Iterator[list[Delta]]:
        """Generate ``rows`` as one batch, one forward at a time: yield the deltas of each
        (a failed row's has finish reason ``"error"``; the others go on)."""
        batch = self.batch()
        batch.admit(rows)
        try:
            while batch:
                yield from batch.step()
        finally:
            batch.close()

    def _count(self, **increments):
        with self._stats_lock:
            for name, value in increments.items():
                self._counters[name] += value

    @torch.no_grad()
    def _forward(self, adapters, input_ids, mask, positions, cache):
        """One forward of rows with ``adapters`` (one name or ``None`` per row);
        ``(last logits, cache)``."""
        output = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_argument: cache},
        )
        self._count(forwards=1)
        return output.logits[:, -1].float(), output[self._cache_argument]

    def _sample_rows(self, rows, logits):
        """Sample and advance each of ``rows`` from its own ``logits`` row (masked to what its
        structured-output constraint allows); a row whose logits are not finite or whose
        sampling fails gets its error, alone. Return the deltas."""
        finite = torch.isfinite(logits).all(-1).tolist()
        deltas = []
        for i, row in enumerate(rows):
            try:
                if not finite[i]:
                    raise GenerationError(
                        f"adapter '{row.adapter}': the model's logits are not finite (NaN or infinite) at token "
                        f"{len(row.token_ids) + 1}; the adapter's weights are broken: load a good copy or retrain it"
                        if row.adapter is not None
                        else f"the model's logits are not finite (NaN or infinite) at token {len(row.token_ids) + 1}"
                    )
                allowed = row.constraint.allowed(logits.shape[-1]) if row.constraint is not None else None
                token = _sample(logits[i], row.params, row.generator, allowed)
                delta = _advance(row, token, self.tokenizer, self.eos_ids, self._tokenizer_lock)
            except Exception as exc:  # this row fails, not its batch
                row.fail(
                    exc if isinstance(exc, FtengineError) else GenerationError(f"sampling failed: {type(exc).__name__}: {exc}")
                )
                delta = Delta(row.index, "", [], "error", row)
            if delta.text or delta.finish_reason:
                deltas.append(delta)
        return deltas

    def _rows_joined(self, rows):
        """``rows`` were admitted into a batch."""

    def _rows_left(self, rows):
        """``rows`` left their batch (finished, failed or cancelled)."""

    def _idle(self):
        """A batch has no rows left."""


class AdapterServer(Engine):
    """One base model and any number of named adapters, each request row naming its own.

    :param model_name: the base model (local directory, hub id, ``.gguf`` file or ``"default"``).
    :param adapters: ``{name: adapter directory}`` to load at once (never evicted).
    :param plugins: more plugins to activate (``["qlora"]`` for a 4-bit base); the plugins an
        adapter needs are found from its ``adapter_config.json``.
    :param sections: config sections for the plugins (``{"qlora": {"blocksize": 64}}``).
    :param max_batch_size: rows per forward; longer calls run in several batches.
    :param strict: refuse adapters trained on another base model (default: warn), at start and
        in ``load``.
    :param adapter_dir: a directory whose every folder is an adapter, served by its folder name
        and loaded on its first request.
    :param max_loaded_adapters: adapters of ``adapter_dir`` loaded at once; beyond, the least
        recently used one that no request holds is evicted.
    :param adapter_wait_s: how long a request waits for one of them to be free when every one is
        held, before ``AdaptersBusyError``.
    """

    def __init__(
        self,
        model_name,
        adapters=None,
        plugins=(),
        sections=None,
        max_batch_size=16,
        strict=False,
        adapter_dir=None,
        max_loaded_adapters=8,
        adapter_wait_s=60.0,
    ):
        adapters = dict(adapters or {})
        self.strict = strict
        self.adapter_dir = _check_adapter_dir(adapter_dir)  # before the weights load
        if not (isinstance(max_loaded_adapters, int) and max_loaded_adapters >= 1):
            raise FtengineError(f"max_loaded_adapters: {max_loaded_adapters!r} is not valid; give an integer >= 1")
        self.max_loaded_adapters, self.adapter_wait_s = max_loaded_adapters, adapter_wait_s
        # The plugins every adapter under adapter_dir needs are active from the start (an
        # unreadable one is refused at its first request, naming its problem).
        on_demand_plugins = [p for path in self._adapter_folders().values() for p in _plugins_or_none(path)]
        model, tokenizer, self.pm, self._config = build_for_inference(
            model_name, adapters, [*plugins, *on_demand_plugins], sections, strict
        )
        super().__init__(model, tokenizer)
        set_adapter(self.model, self.pm, None)  # rows name their adapters; none is active
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self._adapters = {name: Path(path) for name, path in adapters.items()}
        self._lock = threading.RLock()  # one forward (or load/unload) at a time
        self._rows_set = None
        self._in_use = {}  # adapter name -> rows in a running batch
        # Requests holding each adapter, from before they queue until their rows leave the
        # engine; notified when one is released. Taken after _lock when both are needed.
        self._holds = collections.Counter()
        self._released = threading.Condition()
        self._on_demand = collections.OrderedDict()  # adapters loaded from adapter_dir, least recently used first
        self._loading = {}  # name -> its lock: concurrent first requests load it once
        self.evictions = 0  # adapters of adapter_dir evicted to make room
        self._recent_tokens = collections.deque()  # (start, end, tokens) of recent forwards
        self.context_length = getattr(self.model.config, "max_position_embeddings", None) or 2048
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

    @property
    def servable(self):
        """``{name: directory}`` of every adapter a request may name: the loaded ones, then the
        folders of ``adapter_dir`` not loaded (by name)."""
        folders = self._adapter_folders()
        return self.adapters | {name: folders[name] for name in sorted(folders) if name not in self._adapters}

    def load(self, name, path):
        """Load the adapter directory ``path`` under ``name`` (never evicted); a bad adapter
        leaves the server as it was (``AdapterError`` naming the problem)."""
        with self._lock, self._released:
            self._load(name, Path(path))

    def unload(self, name):
        """Remove adapter ``name``; refused (``AdapterInUseError``) while a request holds it:
        queued or generating."""
        with self._lock, self._released:
            if name not in self._adapters:
                raise UnknownModelError(f"no adapter named '{name}' is loaded (loaded: {', '.join(self._adapters) or 'none'})")
            if self._holds[name] or self._in_use.get(name):
                users = f"{self._holds[name]} in-flight request(s)" if self._holds[name] else f"{self._in_use[name]} row(s)"
                raise AdapterInUseError(
                    f"adapter '{name}' is in use by {users} (queued or generating); unload it when they finish", "lora_name"
                )
            self._remove(name)

    def acquire(self, names):
        """Hold the adapters ``names`` (``None``: the base) for one request until ``release``:
        one of ``adapter_dir`` is loaded on its first request, after evicting the least recently
        used adapter that nothing holds when ``max_loaded_adapters`` are loaded. A held adapter
        is never evicted or unloaded. Blocks while loading: call it off an event loop."""
        held = []
        try:
            for name in dict.fromkeys(n for n in names if n is not None):
                self._acquire(name)
                held.append(name)
        except BaseException:
            self.release(held)
            raise

    def release(self, names):
        """Let go of the adapters ``acquire(names)`` held."""
        with self._released:
            for name in dict.fromkeys(n for n in names if n is not None):
                self._holds[name] -= 1
                if not self._holds[name]:
                    del self._holds[name]
                    self._released.notify_all()

    @contextlib.contextmanager
    def holding(self, names):
        """``acquire(names)`` for the ``with`` block."""
        self.acquire(names)
        try:
            yield
        finally:
            self.release(names)

    def _acquire(self, name):
        with self._released:
            if self._hold_if_loaded(name):
                return
        folder = self._folder_of(name)
        with self._loading.setdefault(name, threading.Lock()):
            deadline = time.monotonic() + self.adapter_wait_s
            while True:
                with self._lock, self._released:
                    if self._hold_if_loaded(name):
                        return
                    if self._make_room():
                        self._load_on_demand(name, folder)
                        self._hold_if_loaded(name)
                        return
                    # Every loaded adapter of adapter_dir is held: wait for a release.
                    left = deadline - time.monotonic()
                if left <= 0:
                    raise AdaptersBusyError(
                        f"model '{name}': all {self.max_loaded_adapters} adapters that may be loaded from --adapter-dir are "
                        f"in use by in-flight requests; retry shortly, or start the server with a larger --max-loaded-adapters",
                        "model",
                    )
                # Woken by a release (a request lets go once its rows have left the batch);
                # polled too, so a missed notification costs 50 ms, not the whole wait.
                with self._released:
                    self._released.wait(min(left, 0.05))

    def _hold_if_loaded(self, name):
        if name not in self._adapters:
            return False
        self._holds[name] += 1
        if name in self._on_demand:
            self._on_demand.move_to_end(name)
        return True

    def _make_room(self):
        """Room for one more adapter of ``adapter_dir``, evicting the least recently used one
        that neither a request nor a running row holds; ``False`` when every one is held."""
        if len(self._on_demand) < self.max_loaded_adapters:
            return True
        for name in self._on_demand:
            if not self._holds[name] and not self._in_use.get(name):
                self._remove(name)
                self.evictions += 1
                return True
        return False

    def _load_on_demand(self, name, folder):
        try:
            self._load(name, folder)
        except AdapterError as exc:
            raise RequestError(f"model '{name}': the adapter cannot be loaded: {exc}", "model") from None
        self._on_demand[name] = None

    def _load(self, name, path):
        """Load, check and only then register ``name``; on any failure the model is as it was."""
        check_adapter_name(name, self._adapters, path)
        missing = [p for p in plugins_for_adapter(path) if p not in active_names(self.pm)]
        if missing:
            raise AdapterError(
                f"{path}: this adapter needs the plugin(s) {', '.join(missing)}, which the server was not started with; "
                f"restart it with {' '.join(f'--plugin {p}' for p in missing)}"
            )
        try:
            self.model = load_adapter(self.model, self._config, self.pm, name, path, self.strict)
            self.model.requires_grad_(False)
            self.model.eval()
            set_adapter(self.model, self.pm, None)
            self._rows_set = None
            self._check_output(name, path)
        except BaseException:
            self._set_rows(None)
            self._remove(name)  # whatever part of it was put in the model
            raise
        self._set_rows(None)
        self._adapters[name] = path

    @torch.no_grad()
    def _check_output(self, name, path):
        """One forward of one token with the adapter: it shares a batch (``set_rows`` refuses
        prompt tuning) and its logits are finite, whatever its weights and scale combine to."""
        self._set_rows([name])
        token = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else 0
        logits = self.model(input_ids=torch.tensor([[token]], device=self.device)).logits
        if not bool(torch.isfinite(logits).all()):
            raise AdapterError(
                f"{path}: the adapter makes the model output NaN or infinity (its weights or lora_alpha are out of range); "
                f"use an earlier checkpoint or train it again"
            )

    def _remove(self, name):
        adapter_methods(self.pm).delete(self.model, name)
        self._adapters.pop(name, None)
        self._on_demand.pop(name, None)
        self._rows_set = None

    def _adapter_folders(self):
        """``{name: folder}`` of the adapters under ``adapter_dir``: folders holding an adapter
        config, with a valid adapter name, inside it once symlinks are resolved."""
        if self.adapter_dir is None:
            return {}
        root = self.adapter_dir.resolve()
        return {
            path.name: path
            for path in self.adapter_dir.iterdir()
            if not adapter_name_problem(path.name) and path.resolve().is_relative_to(root) and (path / CONFIG_FILE).is_file()
        }

    def _folder_of(self, name):
        """The folder of ``adapter_dir`` that serves ``name``; ``RequestError`` for a name that
        is no folder of it (``..``, a path, a symlink leading outside), ``UnknownModelError``
        for one that does not exist."""
        if self.adapter_dir is None:
            self.check_adapter(name)
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name or "\0" in name:
            raise RequestError(
                f"'{name}' is not an adapter folder name: a model served from --adapter-dir is one folder of "
                f"{self.adapter_dir}, named without '/' or '..'",
                "model",
            )
        folder = self.adapter_dir / name
        if not folder.is_dir():
            self.check_adapter(name)
        resolved = folder.resolve()
        if not resolved.is_relative_to(self.adapter_dir.resolve()):
            raise RequestError(
                f"model '{name}': {folder} leads to {resolved}, outside the adapter directory {self.adapter_dir}; "
                f"it is not served (copy the adapter into it instead of linking)",
                "model",
            )
        if adapter_name_problem(name):
            raise RequestError(f"model '{name}': adapter name {adapter_name_problem(name)}; rename its folder", "model")
        return resolved

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
            where = f", nor any under {self.adapter_dir}" if self.adapter_dir is not None else ""
            raise UnknownModelError(
                f"the model '{name}' does not exist: load it first (loaded adapters: {', '.join(self._adapters) or 'none'}"
                f"{where})",
                param="model",
            )

    # ----------------------------------------------------------------------------------------
    # prompts
    # ----------------------------------------------------------------------------------------

    def encode(self, prompt, chat=False):
        """Token ids of ``prompt``: text, token ids, or (``chat=True``) a list of messages
        rendered with the tokenizer's chat template."""
        if chat:
            for message in prompt:
                if isinstance(message.get("content"), str):
                    check_text(message["content"], "messages")
            if not self.tokenizer.chat_template:
                raise RequestError(
                    "messages: this model's tokenizer has no chat template; use the completions endpoint", "messages"
                )
            with self._tokenizer_lock:
                return encode_chat_text(self.tokenizer, render_prompt(self.tokenizer, prompt))["input_ids"]
        if isinstance(prompt, str):
            check_text(prompt, "prompt")
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
        prompts, adapters = _one_adapter_per_prompt(prompts, adapters)
        sampling = SamplingParams(**params)
        constraint = self.constraint(response_format)
        with self.holding(adapters):
            rows = self._rows(prompts, adapters, sampling, constraint)
            for _ in self._run_all(rows):
                pass
        return [row.completion() for row in rows]

    def stream(self, prompts, adapters=None, response_format=None, **params) -> Iterator[Delta]:
        """Like ``generate``, but yields each row's new text as it is generated (``Delta``s;
        a row's last one carries its finish reason). Its adapters are held (loaded) from the
        first ``next`` until the iterator ends or is closed."""
        prompts, adapters = _one_adapter_per_prompt(prompts, adapters)
        sampling = SamplingParams(**params)
        constraint = self.constraint(response_format)

        def held():
            with self.holding(adapters):
                yield from self._run_all(self._rows(prompts, adapters, sampling, constraint))

        return held()

    def _rows(self, prompts, adapters, sampling, constraint):
        return [
            self.row(self.encode(p), a, sampling, index=i, constraint=constraint)
            for i, (p, a) in enumerate(zip(prompts, adapters))
        ]

    def _run_all(self, rows):
        for start in range(0, len(rows), self.max_batch_size):
            for deltas in self.run(rows[start : start + self.max_batch_size]):
                for delta in deltas:
                    if delta.finish_reason == "error":
                        raise delta.row.error
                    yield delta

    def stats(self):
        """The engine's counters: forwards, tokens, rows admitted (into a running batch too),
        running, cancelled and failed rows, tokens/s over the last ``TOKENS_PER_S_WINDOW_S``,
        loaded adapters and ``evictions`` (adapters of ``adapter_dir`` evicted to make room)."""
        with self._stats_lock:
            now = time.monotonic()
            while self._recent_tokens and self._recent_tokens[0][1] < now - TOKENS_PER_S_WINDOW_S:
                self._recent_tokens.popleft()
            span = now - self._recent_tokens[0][0] if self._recent_tokens else 0
            recent = sum(tokens for _, _, tokens in self._recent_tokens)
            return {
                **self._counters,
                "tokens_per_s": recent / span if span > 0 else 0.0,
                "loaded_adapters": len(self._adapters),
                "evictions": self.evictions,
            }

    def _forward(self, adapters, input_ids, mask, positions, cache):
        start = time.monotonic()
        with self._lock:
            self._set_rows(adapters)
            output = super()._forward(adapters, input_ids, mask, positions, cache)
        with self._stats_lock:
            self._recent_tokens.append((start, time.monotonic(), len(adapters)))
        return output

    def _rows_joined(self, rows):
        with self._lock:
            for row in rows:
                self._in_use[row.adapter] = self._in_use.get(row.adapter, 0) + 1

    def _rows_left(self, rows):
        with self._lock:
            for row in rows:
                self._in_use[row.adapter] -= 1

    def _idle(self):
        with self._lock:
            self._set_rows(None)  # the model answers plain forwards again


# --------------------------------------------------------------------------------------------
# the sampling loop
# --------------------------------------------------------------------------------------------


def generate_rows(model, tokenizer, rows):
    """Generate ``rows`` (``Row`` s, each with its own ``SamplingParams`` and seeded
    ``generator``) as one ``Batch`` with ``model`` as it is (its active adapter, its mode);
    return them, finished: ``token_ids`` (the EOS that ended a row included) and ``text`` (cut
    at a stop string). A row that failed (non-finite logits) raises its error. Training-time
    sampling (``grpo``) uses it."""
    for _ in Engine(model, tokenizer).run(rows):
        pass
    failed = next((row for row in rows if row.error is not None), None)
    if failed is not None:
        raise failed.error
    return rows


def _advance(row, token, tokenizer, eos_ids, tokenizer_lock):
    """Append ``token`` to ``row``: stop at EOS, a stop string, the end of its constrained
    output or ``max_tokens``; return the text that is now safe to show (held back while it may
    be the start of a stop string). A constrained row ignores stop strings, which could cut its
    JSON short: it ends when the JSON is complete."""
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


class Batch:
    """Rows generated together, admitted at any step and retired the moment they finish
    (iteration-level scheduling, as Orca and vLLM do).

        batch = server.batch()
        batch.admit(rows)           # any time: prefilled together at the next step
        while batch:
            for deltas in batch.step():   # one list per forward: the prefill, then the decode
                ...
        batch.close()

    The running rows share one left-padded KV cache (``DynamicCache``) with an attention mask
    and each row's own positions. A step prefills the rows admitted since the last one in one
    forward, samples their first tokens, appends their cache rows to the running cache (the
    shorter side padded on the left) and then decodes every running row by one token. Rows
    keep their order, so the adapters per row change only when a row joins or leaves. A row
    whose logits are not finite or whose sampling fails gets its error alone; a forward that
    raises fails the rows in it (the prefill: only the newcomers).
    """

    def __init__(self, engine):
        self.engine = engine
        self.rows, self.pending = [], []  # decoding (in cache order); admitted, not prefilled
        self.cache = self.mask = self.positions = self.tokens = None

    def __len__(self):
        return len(self.rows) + len(self.pending)

    def admit(self, rows):
        """Add ``rows`` (``AdapterServer.row`` s); they join at the next ``step``."""
        self.engine._rows_joined(rows)
        running = bool(self.rows or self.pending)
        self.engine._count(rows_admitted=len(rows), rows_admitted_mid_batch=len(rows) if running else 0, running_rows=len(rows))
        self.pending.extend(rows)

    def step(self) -> Iterator[list[Delta]]:
        """Prefill the rows admitted since the last step, then decode every running row by one
        token; yield the deltas after each forward."""
        self.engine._count(steps=1)
        self._drop(self.pending, [i for i, row in enumerate(self.pending) if not row.cancelled])
        self._keep([i for i, row in enumerate(self.rows) if not row.cancelled])
        if self.pending:
            yield self._prefill()
        if self.rows:
            yield self._decode()
        if not self:
            self.engine._idle()

    def close(self):
        """Retire every row still in the batch (a caller that stopped early)."""
        for row in self.rows + self.pending:
            if row.finish_reason is None:
                row.cancel()
        self._drop(self.pending, [])
        self._keep([])
        self.engine._idle()

    def _prefill(self):
        newcomers, self.pending = self.pending, []
        device = self.engine.device
        width = max(len(r.prompt_ids) for r in newcomers)
        pad = self.engine.tokenizer.pad_token_id if self.engine.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in newcomers], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in newcomers], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        try:
            logits, cache = self.engine._forward([r.adapter for r in newcomers], input_ids, mask, positions, _new_cache())
        except Exception as exc:  # the newcomers fail; the running rows go on
            deltas = _failed(newcomers, exc)
            self._retire(newcomers)
            return deltas
        deltas = self._sampled(newcomers, logits)
        keep = [i for i, row in enumerate(newcomers) if row.finish_reason is None]
        self._drop(newcomers, keep)  # newcomers: now the rows that go on
        if keep:
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            joined = newcomers
            tokens = torch.tensor([row.token_ids[-1] for row in joined], device=device)
            lengths = torch.tensor([len(row.prompt_ids) for row in joined], device=device)
            self._join(joined, cache, mask[index], lengths, tokens)
        return deltas

    def _decode(self):
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        try:
            logits, self.cache = self.engine._forward(
                [r.adapter for r in self.rows], self.tokens.unsqueeze(1), mask, self.positions.unsqueeze(1), self.cache
            )
        except Exception as exc:  # every running row was in this forward
            deltas = _failed(self.rows, exc)
            self._keep([])
            return deltas
        self.mask, self.positions = mask, self.positions + 1
        deltas = self._sampled(self.rows, logits)
        self._keep([i for i, row in enumerate(self.rows) if row.finish_reason is None])
        if self.rows:
            self.tokens = torch.tensor([row.token_ids[-1] for row in self.rows], device=self.engine.device)
            self._trim()
        return deltas

    def _sampled(self, rows, logits):
        deltas = self.engine._sample_rows(rows, logits)
        self.engine._count(generated_tokens=sum(1 for row in rows if row.finish_reason != "error"))
        return deltas

    def _join(self, rows, cache, mask, positions, tokens):
        """Append rows with their ``cache`` to the running ones, left-padding the shorter side."""
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.tokens = rows, cache, mask, positions, tokens
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for running, joining in zip(self.cache.layers, cache.layers):
            running.keys = torch.cat([_pad_left(running.keys, width, -2), _pad_left(joining.keys, width, -2)])
            running.values = torch.cat([_pad_left(running.values, width, -2), _pad_left(joining.values, width, -2)])
        self.mask = torch.cat([_pad_left(self.mask, width, -1), _pad_left(mask, width, -1)])
        self.rows = self.rows + rows
        self.positions = torch.cat([self.positions, positions])
        self.tokens = torch.cat([self.tokens, tokens])

    def _keep(self, keep):
        """Keep only the running rows at indices ``keep`` (in order); retire the others."""
        if len(keep) == len(self.rows):
            return
        self._drop(self.rows, keep)
        if not keep:
            self.rows, self.cache, self.mask, self.positions, self.tokens = [], None, None, None, None
            return
        index = torch.tensor(keep, device=self.engine.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.tokens = self.mask[index], self.positions[index], self.tokens[index]

    def _drop(self, rows, keep):
        """Retire the rows of ``rows`` not at indices ``keep``, in place."""
        kept = set(keep)
        self._retire([row for i, row in enumerate(rows) if i not in kept])
        rows[:] = [rows[i] for i in keep]

    def _retire(self, rows):
        for row in rows:
            if row.cancelled and row.finish_reason is None:
                row.finish_reason = "cancelled"
        self.engine._rows_left(rows)
        self.engine._count(
            running_rows=-len(rows),
            cancelled_rows=sum(row.finish_reason == "cancelled" for row in rows),
            failed_rows=sum(row.finish_reason == "error" for row in rows),
        )

    def _trim(self):
        """Drop the cache columns every row pads (left by longer rows that have finished)."""
        first = int(self.mask.any(0).int().argmax())
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            self.mask = self.mask[:, first:]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _failed(rows, exc):
    """Fail ``rows`` with ``exc``; their last deltas."""
    for row in rows:
        row.fail(exc)
    return [Delta(row.index, "", [], "error", row) for row in rows]


def _pad_left(tensor, width, dim):
    """``tensor`` with zeros added before its entries along ``dim`` up to ``width``."""
    missing = width - tensor.shape[dim]
    if not missing:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _new_cache():
    from transformers import DynamicCache

    return DynamicCache()


def _one_adapter_per_prompt(prompts, adapters):
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if adapters is None or isinstance(adapters, str):
        adapters = [adapters] * len(prompts)
    if len(adapters) != len(prompts):
        raise RequestError(f"{len(prompts)} prompts but {len(adapters)} adapters: give one adapter per prompt", "adapters")
    return prompts, list(adapters)


def _check_adapter_dir(adapter_dir):
    if adapter_dir is None:
        return None
    path = Path(adapter_dir).expanduser()
    if not path.is_dir():
        raise FtengineError(
            f"--adapter-dir {adapter_dir}: {'not a directory' if path.exists() else 'does not exist'}; give the directory "
            f"whose folders are the adapters to serve"
        )
    return path


def _plugins_or_none(path):
    """The plugins the adapter directory ``path`` needs; none for one that cannot be read (its
    first request says why)."""
    try:
        return plugins_for_adapter(path)
    except AdapterError:
        return []


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
        drop[0] = False
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
