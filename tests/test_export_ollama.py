"""The Ollama Modelfile: its Go template renders every chat as the model's Jinja chat template.

The Go template is run by a small renderer of the subset of Go's ``text/template`` that
Ollama's templates use (text, ``{{- -}}`` trimming, ``range``, ``if``/``else``, variables, ``eq``,
``ne``, ``and``, ``or``, ``not``, ``len``, ``slice``, ``index``), fed the way Ollama's
``template.Execute`` feeds it: the Modelfile's ``SYSTEM`` put first when a chat has none, then
consecutive messages of one role merged.
"""

import re

import pytest
from ftengine.plugins.export.ollama import FORMATS, modelfile, translate
from ftengine.testing import TINY_CHAT_TEMPLATE, tiny_tokenizer

# SmolLM2-135M-Instruct's chat template (the default model's), as its tokenizer_config.json has it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct's.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Zephyr's: a format Ollama's language could express, but not one of ours.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You extract contacts."}, {"role": "user", "content": "Ann, 34, Oslo"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Two lines:\nhere and\nthere"},
    ],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "and 2+2?"},
        {"role": "assistant", "content": "4"},
    ],
    [{"role": "user", "content": "{{ not a template }} and <b>tags</b>"}],
]


# --- a renderer of Go text/template, the subset Ollama's templates use -------------------------

ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
OPERAND = re.compile(r'\s*("(?:\\.|[^"\\])*"|\(|\)|[^\s()]+)')


def go_tokens(text):
    """``[("text", s) | ("action", s)]`` with ``{{-``/``-}}`` trimming applied."""
    parts, position, trim_next = [], 0, False
    for match in ACTION.finditer(text):
        literal = text[position : match.start()]
        if trim_next:
            literal = literal.lstrip()
        if match.group(1):
            literal = literal.rstrip()
        parts.append(("text", literal))
        parts.append(("action", match.group(2).strip()))
        trim_next, position = bool(match.group(3)), match.end()
    literal = text[position:]
    parts.append(("text", literal.lstrip() if trim_next else literal))
    return parts


def parse(parts):
    """A tree of ``("text", s)``, ``("print", expr)``, ``("set", var, expr)``,
    ``("if", expr, then, else)``, ``("range", vars, expr, body)``."""

    def block(index):
        nodes = []
        while index < len(parts):
            kind, value = parts[index]
            index += 1
            if kind == "text":
                nodes.append(("text", value))
            elif value in ("end", "else"):
                return nodes, index, value
            elif value.startswith("if "):
                then, index, stop = block(index)
                otherwise = []
                if stop == "else":
                    otherwise, index, _ = block(index)
                nodes.append(("if", value[3:], then, otherwise))
            elif value.startswith("range "):
                header = value[6:]
                names = []
                if ":=" in header:
                    declared, header = header.split(":=", 1)
                    names = [name.strip() for name in declared.split(",")]
                body, index, _ = block(index)
                nodes.append(("range", names, header, body))
            elif re.match(r"\$\w+\s*:=", value):
                name, expression = value.split(":=", 1)
                nodes.append(("set", name.strip(), expression))
            else:
                nodes.append(("print", value))
        return nodes, index, None

    return block(0)[0]


def truthy(value):
    return bool(value)  # Go: false, 0, "", an empty list and nil are false


FUNCTIONS = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "and": lambda *args: next((a for a in args if not truthy(a)), args[-1]),
    "or": lambda *args: next((a for a in args if truthy(a)), args[-1]),
    "not": lambda a: not truthy(a),
    "len": len,
    "slice": lambda items, start: items[start:],
    "index": lambda items, i: items[i],
}


def field(value, path):
    for name in filter(None, path.split(".")):
        value = value.get(name) if isinstance(value, dict) else None  # missingkey=zero
    return "" if value is None else value


def evaluate(expression, dot, variables):
    tokens = OPERAND.findall(expression)

    def command(position):
        """Evaluate a command starting at ``position``; return ``(value, next position)``."""
        operands = []
        while position < len(tokens) and tokens[position] != ")":
            token = tokens[position]
            if token == "(":
                value, position = command(position + 1)
                position += 1  # the ")"
            else:
                value, position = operand(token), position + 1
            operands.append(value)
        if operands and callable(operands[0]):
            return operands[0](*operands[1:]), position
        assert len(operands) == 1, f"not a Go template value: {expression!r}"
        return operands[0], position

    def operand(token):
        if token.startswith('"'):
            return token[1:-1].encode().decode("unicode_escape")
        if token.isdigit():
            return int(token)
        if token in FUNCTIONS:
            return FUNCTIONS[token]
        if token.startswith("$"):
            name, _, path = token.partition(".")
            return field(variables[name], path)
        assert token.startswith("."), f"unsupported operand {token!r}"
        return field(dot, token)

    return command(0)[0]


def execute(nodes, dot, variables):
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "print":
            out.append(str(evaluate(node[1], dot, variables)))
        elif node[0] == "set":
            variables[node[1]] = evaluate(node[2], dot, variables)
        elif node[0] == "if":
            _, expression, then, otherwise = node
            branch = then if truthy(evaluate(expression, dot, variables)) else otherwise
            out.append(execute(branch, dot, dict(variables)))
        elif node[0] == "range":
            _, names, expression, body = node
            for i, item in enumerate(evaluate(expression, dot, variables)):
                scope = dict(variables)
                if len(names) == 2:
                    scope[names[0]], scope[names[1]] = i, item
                elif names:
                    scope[names[0]] = item
                out.append(execute(body, item, scope))
    return "".join(out)


def ollama_prompt(modelfile_text, messages):
    """The prompt Ollama renders for ``messages`` (a chat request) with this Modelfile."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', modelfile_text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', modelfile_text, re.S | re.M)
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system.group(1)}, *messages]
    collated = []
    for message in messages:
        if collated and collated[-1]["Role"] == message["role"]:
            collated[-1]["Content"] += "\n\n" + message["content"]
        else:
            collated.append({"Role": message["role"], "Content": message["content"]})
    data = {"Messages": collated, "System": "\n\n".join(m["Content"] for m in collated if m["Role"] == "system")}
    return execute(parse(go_tokens(template)), data, {"$": data})


def test_the_renderer_is_go_text_template():
    """The renderer against what Go's text/template gives by its documentation (trim markers,
    range with index, variables, nested calls), for the constructs the translated templates use."""
    data = {"Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}]}
    run = lambda text: execute(parse(go_tokens(text)), data, {"$": data})  # noqa: E731
    assert run('x {{- " " -}} y') == "x y"
    assert run("a  {{- 1 }}  b") == "a1  b"
    assert run("{{ 1 -}}  \n b") == "1b"
    assert run("{{ range $i, $m := .Messages }}{{ $i }}{{ .Role }}{{ $m.Content }};{{ end }}") == "0usera;1assistantb;"
    assert run("{{ range $i, $_ := .Messages }}{{ if eq (len (slice $.Messages $i)) 1 }}last{{ end }}{{ end }}") == "last"
    assert run('{{ if and (eq 1 1) (ne "a" "a") }}yes{{ else }}no{{ end }}') == "no"
    assert run("{{ $x := index .Messages 1 }}{{ $x.Role }}") == "assistant"


@pytest.fixture(scope="module")
def tokenizers():
    """A tokenizer per template: ChatML (the tiny model's), SmolLM2's, Llama 3's, Zephyr's."""
    from tokenizers import processors

    made = {}
    for name, template in [("chatml", TINY_CHAT_TEMPLATE), ("smollm2", SMOLLM2_TEMPLATE), ("zephyr", ZEPHYR_TEMPLATE)]:
        made[name] = tiny_tokenizer()
        made[name].chat_template = template
    llama3 = tiny_tokenizer()
    llama3.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        }
    )
    llama3.eos_token = "<|eot_id|>"
    bos = ("<|begin_of_text|>", llama3.bos_token_id)
    llama3.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[bos])
    llama3.chat_template = LLAMA3_TEMPLATE
    made["llama3"] = llama3
    return made


@pytest.mark.parametrize(
    "name, format_name, system",
    [
        ("chatml", "ChatML", None),
        ("smollm2", "ChatML", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
        ("llama3", "Llama 3", None),
    ],
)
def test_a_known_template_renders_every_chat_as_the_jinja_template(tokenizers, name, format_name, system):
    tokenizer = tokenizers[name]
    translation = translate(tokenizer)
    assert translation.format.name == format_name
    assert translation.default_system == system
    text = modelfile(tokenizer, "model-f16.gguf")
    bos = tokenizer.bos_token if name == "llama3" else ""  # added by the runtime's tokenizer there
    for chat in CHATS:
        jinja = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=chat[-1]["role"] != "assistant")
        assert bos + ollama_prompt(text, chat) == jinja
    if system is not None:
        assert f'SYSTEM """{system}"""' in text


def test_the_modelfile_names_the_gguf_and_the_stop_tokens(tokenizers):
    text = modelfile(tokenizers["chatml"], "model-q8_0.gguf")
    assert "FROM ./model-q8_0.gguf\n" in text
    assert text.count("PARAMETER stop") == 1 and 'PARAMETER stop "<|im_end|>"' in text
    llama3 = modelfile(tokenizers["llama3"], "m.gguf")
    assert 'PARAMETER stop "<|eot_id|>"' in llama3
    assert "strips whitespace" in llama3  # the one difference, said where the user reads it


def test_an_unknown_template_gets_no_template_and_a_comment_saying_so(tokenizers):
    text = modelfile(tokenizers["zephyr"], "model-f16.gguf")
    assert translate(tokenizers["zephyr"]) is None
    assert "TEMPLATE" not in text.replace("write a TEMPLATE", "")
    assert "could not be translated" in text
    assert 'PARAMETER stop "<|im_end|>"' in text  # the eos still ends an answer


def test_a_template_that_writes_bos_is_not_translated_when_the_tokenizer_does_not_add_it(tokenizers):
    """Llama 3's template with a tokenizer that adds no BOS: a Go template without BOS would
    differ from training, so none is written."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tokenizer.chat_template = LLAMA3_TEMPLATE
    assert translate(tokenizer) is None


def test_every_format_compiles_to_the_format_it_renders():
    """Each format's Go template and its Python rendering (what recognition compares with) agree."""
    for turn_format in FORMATS:
        text = f'TEMPLATE """{turn_format.go_template()}"""'
        for chat in CHATS:
            assert ollama_prompt(text, chat) == turn_format.render(chat, chat[-1]["role"] != "assistant")
