"""Named chat templates for models that ship none (base models), and choosing one.

``data.template`` is null (the tokenizer's own template), a name from :data:`TEMPLATES`, or a
path to a ``.jinja`` file. Whatever is chosen is set on the tokenizer, so it is saved with the
adapter and later merged models, and chat renders exactly as training did. Each named
template closes assistant turns with its ``stop`` token; when that token is not the
tokenizer's EOS, it becomes the EOS so that generation stops there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from danlu.errors import UserError


@dataclass(frozen=True)
class Template:
    """A Jinja chat template and the token that ends an assistant turn (None: the tokenizer's EOS)."""

    jinja: str
    stop: str | None = None


def _chatml(default_system: str | None) -> str:
    system = (
        "{%- if messages[0]['role'] != 'system' %}"
        f"{{{{ '<|im_start|>system\\n{default_system}<|im_end|>\\n' }}}}"
        "{%- endif %}"
        if default_system
        else ""
    )
    return (
        system + "{%- for m in messages %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    )


TEMPLATES: dict[str, Template] = {
    "chatml": Template(_chatml(None), stop="<|im_end|>"),
    "qwen": Template(_chatml("You are a helpful assistant."), stop="<|im_end|>"),
    "internlm2": Template(
        "{{ bos_token }}{%- for m in messages %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}",
        stop="<|im_end|>",
    ),
    "llama3": Template(
        "{{ bos_token }}{%- for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}",
        stop="<|eot_id|>",
    ),
    "llama2": Template(
        "{%- if messages[0]['role'] == 'system' %}"
        "{%- set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
        "{%- set messages = messages[1:] %}"
        "{%- else %}{%- set system = '' %}{%- endif %}"
        "{%- for m in messages %}"
        "{%- if m['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + (system if loop.first else '') + m['content'] | trim + ' [/INST]' }}"
        "{%- else %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}{%- endif %}"
        "{%- endfor %}"
    ),
    "mistral": Template(
        "{{ bos_token }}{%- for m in messages %}"
        "{%- if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{%- elif m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
        "{%- else %}{{ m['content'] + eos_token }}{%- endif %}"
        "{%- endfor %}"
    ),
    "alpaca": Template(
        "{%- for m in messages %}"
        "{%- if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
        "{%- elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n' }}"
        "{%- else %}{{ '### Response:\\n' + m['content'] + eos_token + '\\n\\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '### Response:\\n' }}{%- endif %}"
    ),
    "vicuna": Template(
        "{%- for m in messages %}"
        "{%- if m['role'] == 'system' %}{{ m['content'] + ' ' }}"
        "{%- elif m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
        "{%- else %}{{ 'ASSISTANT: ' + m['content'] + eos_token }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ 'ASSISTANT:' }}{%- endif %}"
    ),
}


def apply_template(tokenizer: Any, choice: str | None) -> None:
    """Set ``choice`` (None, a name or a .jinja path) as the tokenizer's chat template."""
    if choice is None:
        return
    if choice in TEMPLATES:
        template = TEMPLATES[choice]
    elif choice.endswith(".jinja"):
        path = Path(choice)
        if not path.is_file():
            raise UserError(f"data.template {choice}: no such file")
        template = Template(path.read_text(encoding="utf-8"))
    else:
        raise UserError(
            f"data.template {choice!r} is not a known template ({', '.join(TEMPLATES)}) or a .jinja file"
        )
    if template.stop is not None:
        stop_id = tokenizer.convert_tokens_to_ids(template.stop)
        if stop_id is None or stop_id == tokenizer.unk_token_id:
            raise UserError(
                f"data.template {choice} ends turns with {template.stop}, which this tokenizer does not have "
                "as one token; use a template that ends turns with the EOS token (alpaca, vicuna, llama2, mistral)"
            )
        tokenizer.eos_token = template.stop  # generation then stops where the template ends a turn
    tokenizer.chat_template = template.jinja
