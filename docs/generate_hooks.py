"""Render core/hookspecs.py into docs/hooks.md: ``python docs/generate_hooks.py``.

tests/test_docs.py fails when docs/hooks.md is out of date, so the reference cannot rot.
"""

import inspect
from pathlib import Path

from ftengine import hookspecs, methods
from ftengine.plugins.lora import hookspecs as lora_hookspecs

HEADER = """# Hook reference

Generated from `core/hookspecs.py` by `python docs/generate_hooks.py`; do not edit by hand.
Implement a hook with `@ftengine.hookimpl` on a function of the same name; an implementation
may take any subset of the arguments. See [writing plugins](writing-plugins.md).

"""


def signature(function):
    """``(name: type, ...) -> type`` as written in the spec (annotations are strings there)."""
    sig = inspect.signature(function)
    params = ", ".join(p.name if p.annotation is p.empty else f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    returns = "" if sig.return_annotation is sig.empty else f" -> {sig.return_annotation}"
    return f"({params}){returns}"


def render_specs(module):
    parts = []
    specs = [f for n, f in inspect.getmembers(module, inspect.isfunction) if n.startswith("ftengine_")]
    for function in sorted(specs, key=lambda f: f.__code__.co_firstlineno):  # source order = phase order
        name = function.__name__
        options = function.ftengine_spec  # set by HookspecMarker
        flags = [flag for flag in ("firstresult", "historic") if options.get(flag)]
        parts.append(f"\n## `{name}{signature(function)}`\n")
        if flags:
            parts.append(f"\n*{', '.join(flags)}*\n")
        parts.append("\n" + inspect.getdoc(function) + "\n")
    return parts


def render_protocol():
    """The members of ``ftengine.AdapterMethod``, in source order."""
    parts = ["\n# Adapter methods: `ftengine.AdapterMethod`\n\n", inspect.getdoc(methods), "\n"]
    for member in methods.PROTOCOL_MEMBERS:
        function = getattr(methods.AdapterMethod, member)
        parts.append(f"\n## `AdapterMethod.{member}{signature(function).replace('(self, ', '(').replace('(self)', '()')}`\n")
        parts.append("\n" + inspect.getdoc(function) + "\n")
    return parts


def render():
    parts = [HEADER, inspect.getdoc(hookspecs), "\n", *render_specs(hookspecs), *render_protocol()]
    parts += ["\n# Hooks added by the `lora` plugin\n\n", inspect.getdoc(lora_hookspecs), "\n", *render_specs(lora_hookspecs)]
    return "".join(parts)


if __name__ == "__main__":
    Path(__file__).with_name("hooks.md").write_text(render())
