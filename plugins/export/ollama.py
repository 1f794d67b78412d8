"""The Ollama ``Modelfile`` written beside an exported GGUF (``ollama create NAME -f Modelfile``).

Ollama formats chats with a Go template of its own, not the Jinja chat template inside the GGUF.
The model's Jinja template is translated when it is a known turn format (``FORMATS``: ChatML,
Llama 3), recognised by what it renders, not by its text: probe conversations are rendered with
the Jinja template and compared with the format's rendering, so a template written differently
(SmolLM2's, with a default system message; Qwen's) is recognised by its output. A default system
message becomes ``SYSTEM``, which Ollama puts first when a chat has no system message, as the
Jinja template did. The Go template then renders every chat as the Jinja template does with
``add_generation_prompt`` when the last message is not the assistant's (Ollama generates
after the rendered text).

A template that matches no format is not guessed at: the Modelfile says so in a comment, and
Ollama picks a template of its own.
"""

from dataclasses import dataclass

from ftengine.modeling import stop_token_ids


@dataclass(frozen=True)
class TurnFormat:
    """A chat format that renders each message as ``start + role + end_of_header + content +
    end_of_turn``, and the generation prompt as the assistant's header."""

    name: str
    start: str
    end_of_header: str
    end_of_turn: str
    note: str = ""

    def header(self, role):
        return f"{self.start}{role}{self.end_of_header}"

    def render(self, messages, add_generation_prompt):
        text = "".join(self.header(m["role"]) + m["content"] + self.end_of_turn for m in messages)
        return text + (self.header("assistant") if add_generation_prompt else "")

    def go_template(self):
        """The format in Ollama's template language: the header of the next assistant turn
        follows the last message unless it is the assistant's."""
        last_and_not_assistant = 'and (eq (len (slice $.Messages $i)) 1) (ne .Role "assistant")'
        return (
            "{{ range $i, $_ := .Messages }}"
            f"{self.start}{{{{ .Role }}}}{self.end_of_header}{{{{ .Content }}}}{self.end_of_turn}"
            f"{{{{ if {last_and_not_assistant} }}}}{self.header('assistant')}{{{{ end }}}}"
            "{{ end }}"
        )


FORMATS = (
    TurnFormat("ChatML", "<|im_start|>", "\n", "<|im_end|>\n"),
    TurnFormat(
        "Llama 3",
        "<|start_header_id|>",
        "<|end_header_id|>\n\n",
        "<|eot_id|>",
        note="Llama 3's template strips whitespace around each message; this one keeps it (Go templates cannot trim)",
    ),
)

# Probe chats: with and without a system message, multi-turn, ending with the user (a generation
# prompt follows) or with the assistant, a message over two lines.
PROBES = (
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": "first line\nsecond line"},
        {"role": "assistant", "content": "{}"},
        {"role": "user", "content": "again"},
    ],
    [{"role": "user", "content": "question"}, {"role": "assistant", "content": "answer"}],
)


@dataclass(frozen=True)
class Translation:
    format: TurnFormat
    default_system: str | None


def _render_jinja(tokenizer, messages, add_generation_prompt):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _adds_bos(tokenizer):
    """Whether tokenizing text prepends the BOS token (then a runtime adds it, not the template)."""
    if tokenizer.bos_token_id is None:
        return False
    return tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]


def _as_ollama_renders(turn_format, default_system, messages):
    """What the Go template renders for ``messages`` once Ollama has put ``SYSTEM`` first."""
    if default_system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}, *messages]
    return turn_format.render(messages, add_generation_prompt=messages[-1]["role"] != "assistant")


def _default_system(turn_format, rendered_user_chat):
    """The system message the Jinja template adds to a chat of one user message, or ``None``."""
    chat = turn_format.render(PROBES[0], add_generation_prompt=True)
    head = rendered_user_chat[: len(rendered_user_chat) - len(chat)]
    if not rendered_user_chat.endswith(chat) or not head:
        return None
    start, end = turn_format.header("system"), turn_format.end_of_turn
    if head.startswith(start) and head.endswith(end):
        return head[len(start) : len(head) - len(end)]
    return None


def translate(tokenizer):
    """The ``Translation`` of ``tokenizer``'s chat template into a ``TurnFormat``, or ``None``
    when it renders the probe chats as no known format does."""
    if not tokenizer.chat_template:
        return None
    bos = tokenizer.bos_token if _adds_bos(tokenizer) else None
    try:
        rendered = [_render_jinja(tokenizer, chat, add_generation_prompt=chat[-1]["role"] != "assistant") for chat in PROBES]
    except Exception:  # a template that cannot render a probe (raise_exception on a role) is not a known format
        return None
    if bos is not None:  # the runtime prepends BOS itself: a Go template must not write it again
        if not all(text.startswith(bos) for text in rendered):
            return None
        rendered = [text[len(bos) :] for text in rendered]
    for turn_format in FORMATS:
        default_system = _default_system(turn_format, rendered[0])
        expected = [_as_ollama_renders(turn_format, default_system, chat) for chat in PROBES]
        if expected == rendered:
            return Translation(turn_format, default_system)
    return None


def _quoted(text):
    return f'"""{text}"""'


def modelfile(tokenizer, gguf_file_name):
    """The text of a ``Modelfile`` for the GGUF ``gguf_file_name`` (in the same directory):
    ``FROM``, the chat template translated into Ollama's (or a comment saying it could not be),
    the default system message, and the tokens that end an answer."""
    lines = [
        "# Ollama model file written by ftengine: ollama create NAME -f Modelfile (in this directory)",
        f"FROM ./{gguf_file_name}",
    ]
    translation = translate(tokenizer)
    if translation is None:
        lines += [
            "# The chat template could not be translated into Ollama's template language (it is not ChatML or",
            "# Llama 3), so Ollama will use its own default. Check that `ollama run` formats chats as the model",
            "# was trained, or write a TEMPLATE here: https://github.com/ollama/ollama/blob/main/docs/template.md",
        ]
    else:
        lines.append(f"# The chat template is {translation.format.name}, translated exactly.")
        if translation.format.note:
            lines.append(f"# Except: {translation.format.note}.")
        lines.append(f"TEMPLATE {_quoted(translation.format.go_template())}")
        if translation.default_system is not None:
            lines.append(f"SYSTEM {_quoted(translation.default_system)}")
    for token in dict.fromkeys(tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer))):
        lines.append(f'PARAMETER stop "{token}"')
    return "\n".join(lines) + "\n"
