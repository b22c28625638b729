"""Chat templates rendered exactly as transformers' `apply_chat_template` renders them.

A chat template is a Jinja program shipped with the tokenizer; rendering it with any other Jinja
settings silently changes whitespace (and so token ids). The environment below copies
transformers 5.x (`utils/chat_template_utils.py`): an immutable sandbox with `trim_blocks`,
`lstrip_blocks`, the `loopcontrols` extension, the `{% generation %}` tag (which records the
character spans of assistant output), `raise_exception`, a `tojson` that does not HTML-escape,
`strftime_now`, and the restricted `dict` / `namespace` globals. The template sees `messages`,
`tools=None`, `documents=None`, `add_generation_prompt` and the special tokens (`bos_token`,
`eos_token`, ...) as strings, like transformers passes `special_tokens_map`.
"""
import contextlib
import datetime
import functools
import json
import re

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

_GENERATION_TAG = re.compile(r"\{\%-?\s*generation\s*-?\%\}")
# transformers copies older names of a message's reasoning into the ones templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _AssistantTracker(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}`: records the character span of its output."""
  tags = {"generation"}

  def __init__(self, environment):
    super().__init__(environment)
    environment.extend(activate_tracker=self.activate_tracker)
    self._blocks = None
    self._spans = None

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_generation_support"), [], [], body
                                  ).set_lineno(lineno)

  @jinja2.pass_eval_context
  def _generation_support(self, context, caller):
    rv = caller()
    if self._blocks is not None:
      start = len("".join(self._blocks))
      self._spans.append((start, start + len(rv)))
    return rv

  @contextlib.contextmanager
  def activate_tracker(self, blocks, spans):
    try:
      self._blocks, self._spans = blocks, spans
      yield
    finally:
      self._blocks, self._spans = None, None


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


class _TemplateDict:
  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
  """jinja's `namespace`, refusing underscore attributes (as transformers does)."""

  def __init__(*args, **kwargs):
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check_name(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(
          f"chat templates cannot set underscore attributes on a namespace ({name!r})")


@functools.lru_cache(maxsize=32)
def compile_template(source: str):
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[_AssistantTracker, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  env.globals["dict"] = _TemplateDict()
  env.globals["namespace"] = _TemplateNamespace
  return env.from_string(source)


def has_generation_tags(source: str) -> bool:
  return bool(_GENERATION_TAG.search(source))


def _prepare(messages):
  """transformers' message normalisation: drop None values, alias reasoning field names."""
  out = []
  for m in messages:
    m = {k: v for k, v in m.items() if v is not None}
    reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
    if reasoning is not None:
      m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
    out.append(m)
  return out


def render(source: str, messages, *, add_generation_prompt: bool, special_tokens: dict,
           with_spans: bool = False):
  """-> rendered text, and (with_spans) the character spans of `{% generation %}` blocks."""
  template = compile_template(source)
  kwargs = dict(messages=_prepare(messages), tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **special_tokens)
  if not with_spans:
    return template.render(**kwargs)
  blocks, spans = [], []
  with template.environment.activate_tracker(blocks, spans):
    for block in template.generate(**kwargs):
      blocks.append(block)
  return "".join(blocks), spans
