# Renders tests/data/hf_features.jinja the way HF transformers compiles chat
# templates (jinja2 ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks,
# loopcontrols, AssistantTracker's {% generation %}, its tojson,
# raise_exception and strftime_now), writing hf_features_expected.json.
# Run from crates/chat/tests/data with jinja2 3.1 installed.
import json, jinja2
from datetime import datetime
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

class AssistantTracker(Extension):
    tags = {"generation"}
    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)
    def _render(self, caller):
        return caller()

def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[AssistantTracker, loopcontrols])
env.filters["tojson"] = tojson
env.globals["raise_exception"] = raise_exception
env.globals["strftime_now"] = lambda f: datetime.now().strftime(f)
template = env.from_string(open("hf_features.jinja").read())

def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]

cases = [
    {"name": "system, skipped turn, break, generation prompt",
     "messages": msgs(("system", "  Be nice.  "), ("user", "Hi "), ("assistant", "skip: hidden"), ("user", "Q1"),
                      ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2"), ("user", "Q3")),
     "add_generation_prompt": True, "tools": None},
    # Tool keys are written sorted: serde_json maps (no preserve_order) iterate sorted.
    {"name": "tools", "messages": msgs(("user", "Hi")), "add_generation_prompt": False,
     "tools": [{"function": {"name": "get_weather", "parameters": {"type": "object"}}, "type": "function"}]},
    {"name": "roles not alternating", "messages": msgs(("user", "Hi"), ("user", "again")),
     "add_generation_prompt": True, "tools": None},
]
for c in cases:
    try:
        c["prompt"] = template.render(messages=c["messages"], tools=c["tools"], documents=None,
                                      add_generation_prompt=c["add_generation_prompt"],
                                      bos_token="<s>", eos_token="</s>")
    except jinja2.exceptions.TemplateError as e:
        c["exception"] = str(e)
json.dump({"source": "jinja2 " + jinja2.__version__ + ", HF transformers' chat template environment", "cases": cases},
          open("hf_features_expected.json", "w"), indent=1, ensure_ascii=False)
