"""Chat templates for the data tests (imported by tests and conftest)."""

# ChatML without {% generation %}: assistant turns are located by rendering prefixes.
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
          "{{ message['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# ChatML with {% generation %} around assistant output (what transformers' assistant masks use);
# renders the same text as CHATML (its newline is an expression because trim_blocks eats a
# newline right after a block tag).
CHATML_GENERATION = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>"
    "{% endgeneration %}{% else %}{{ message['content'] }}<|im_end|>{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Exercises the environment: bos_token, namespace, loopcontrols, raise_exception, tojson,
# trim_blocks / lstrip_blocks whitespace control.
FANCY = """{{ bos_token }}
{%- set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
[{{ ns.n }}] {{ message['role'] | upper }}: {{ message['content'] | tojson }}
{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}
{% endfor %}
{% if add_generation_prompt %}[{{ ns.n + 1 }}] ASSISTANT:{% endif %}"""
