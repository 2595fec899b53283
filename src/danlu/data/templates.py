"""Named chat templates for models that ship none (base models), and choosing one.

``data.template`` is null (the tokenizer's own template), a name from :data:`TEMPLATES`, or a
path to a ``.jinja`` file. Whatever is chosen is set on the tokenizer, so it is saved with the
adapter and later merged models, and chat renders exactly as training did.

Each named template is written here after its family's published format and declares the
token that ends an assistant turn (``stop``; None: the tokenizer's EOS) and the special tokens
it writes (``tokens``). Choosing it checks that the tokenizer has each of them as one token,
so a template meant for another vocabulary is refused instead of being spelled out in pieces;
a ``stop`` that is not the tokenizer's EOS becomes the EOS, so that generation stops where the
template ends a turn and training can check that every trained turn ends with it.

Templates that do not take a message (a role they have no place for, tools) raise on it;
:mod:`danlu.data.render` turns that into an error naming the record, or a skipped record
under ``data.on_error=skip``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from danlu.errors import UserError


@dataclass(frozen=True)
class Template:
    """A Jinja chat template, the token that ends an assistant turn (None: the tokenizer's EOS),
    and the special tokens the template writes, which the tokenizer must have."""

    jinja: str
    stop: str | None = None
    tokens: tuple[str, ...] = ()


# What every template written here starts with: refusing tools, and a macro for roles it has
# no place for. ``NAME`` becomes the template's name. Every tag strips the whitespace around it,
# so only quoted text is output.
_HEAD = r"""{%- macro wrong_role(role) %}
    {{- raise_exception('the NAME template takes system, user and assistant messages, not ' ~ role) }}
{%- endmacro %}
{%- if tools %}{{- raise_exception('the NAME template has no format for tools') }}{%- endif %}
{%- for m in messages %}
    {%- if m.tool_calls is defined and m.tool_calls %}
        {{- raise_exception('the NAME template has no format for tool calls') }}
    {%- endif %}
{%- endfor %}"""


def _chatml(default_system: str | None, bos: bool = False) -> str:
    """ChatML (``<|im_start|>ROLE``, newline, content, ``<|im_end|>``, newline) for any role;
    ``default_system`` where the conversation has no system message; BOS first when ``bos``."""
    head = "{{- bos_token }}" if bos else ""
    if default_system:
        head += (
            "{%- if not messages or messages[0].role != 'system' %}"
            f"{{{{- '<|im_start|>system\\n{default_system}<|im_end|>\\n' }}}}"
            "{%- endif %}"
        )
    return head + (
        "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


# Llama 3: a header per turn, content trimmed, <|eot_id|> after every turn.
_LLAMA3 = r"""{{- bos_token }}
{%- for m in messages %}
    {{- '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' + m.content | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"""

# Llama 2: every user turn opens a new <s>[INST] ... [/INST]; the system prompt goes inside the
# first one between <<SYS>> markers; a reply is " text </s>".
_LLAMA2 = r"""{%- if messages[0].role == 'system' %}
    {%- set system = '<<SYS>>\n' + messages[0].content + '\n<</SYS>>\n\n' %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set system = '' %}
    {%- set turns = messages %}
{%- endif %}
{%- for m in turns %}
    {%- if m.role == 'user' %}
        {{- bos_token + '[INST] ' + (system if loop.first else '') + m.content | trim + ' [/INST]' }}
    {%- elif m.role == 'assistant' %}
        {{- ' ' + m.content | trim + ' ' + eos_token }}
    {%- else %}{{- wrong_role(m.role) }}
    {%- endif %}
{%- endfor %}"""

# Gemma: user and model turns that must alternate; no system role, so a system message is
# folded into the first user turn (as Gemma 2 and 3 do); content trimmed.
_GEMMA = r"""{{- bos_token }}
{%- if messages[0].role == 'system' %}
    {%- set first = messages[0].content | trim + '\n\n' %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set first = '' %}
    {%- set turns = messages %}
{%- endif %}
{%- for m in turns %}
    {%- if (m.role == 'user') != (loop.index0 is even) or m.role not in ('user', 'assistant') %}
        {{- raise_exception('the gemma template needs user and assistant turns in turn, after at most one system message') }}
    {%- endif %}
    {{- '<start_of_turn>' + ('model' if m.role == 'assistant' else 'user') + '\n' }}
    {{- (first if loop.first else '') + m.content | trim + '<end_of_turn>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"""

# Phi-3: a role token and a newline open each turn, <|end|> and a newline close it. Phi-3's own
# template also writes <|endoftext|> after a conversation that ends on a reply; this one does not,
# so that a reply renders alike in the middle and at the end (generation stops on <|end|>).
_PHI3 = r"""{%- for m in messages %}
    {%- if m.role in ('system', 'user', 'assistant') %}
        {{- '<|' + m.role + '|>\n' + m.content + '<|end|>\n' }}
    {%- else %}{{- wrong_role(m.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"""

# GLM-4: [gMASK]<sop>, then "<|role|>\ncontent" per turn with nothing closing it: a reply ends
# where the next role token starts (GLM's generation stops on <|user|> and <|observation|>).
# So that a trained reply carries that stop token, a conversation that ends on an assistant
# message (only training renders those) closes it with <|user|>; in longer conversations that
# is the token that follows anyway, so every reply is trained as "\ntext<|user|>".
_GLM4 = r"""{{- '[gMASK]<sop>' }}
{%- for m in messages %}
    {%- if m.role in ('system', 'user', 'assistant') %}
        {{- '<|' + m.role + '|>\n' + m.content }}
    {%- else %}{{- wrong_role(m.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>' }}
{%- elif messages and messages[-1].role == 'assistant' %}{{- '<|user|>' }}
{%- endif %}"""

# Qwen3: ChatML with reasoning. A reply's reasoning comes from its reasoning_content or from a
# <think>...</think> at the start of its content. Replies after the last user message are
# rendered with their <think> block (the last one always, empty if it has no reasoning);
# earlier replies lose theirs. enable_thinking=false (a template argument) puts an empty
# <think> block into the generation prompt, which switches reasoning off.
_QWEN3 = r"""{%- set ns = namespace(last_user=messages | length - 1) %}
{%- for m in messages %}
    {%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for m in messages %}
    {%- if m.role == 'user' or m.role == 'system' %}
        {{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}
    {%- elif m.role == 'assistant' %}
        {%- set answer = m.content %}
        {%- set thought = '' %}
        {%- if m.reasoning_content is string %}
            {%- set thought = m.reasoning_content %}
        {%- elif '</think>' in answer %}
            {%- set thought = answer.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set answer = answer.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\n' }}
        {%- if loop.index0 > ns.last_user and (loop.last or thought) %}
            {{- '<think>\n' + thought.strip('\n') + '\n</think>\n\n' + answer.lstrip('\n') }}
        {%- else %}
            {{- answer }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- else %}{{- wrong_role(m.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}"""


def _named(name: str, jinja: str) -> str:
    """``jinja`` after :data:`_HEAD`, which names it in its errors."""
    return _HEAD.replace("NAME", name) + jinja


# Mistral (v0.1 style; a system prompt goes inside the next [INST], before the user's text, where
# Mistral's own tokenizers and Ollama's template put it), Alpaca and Vicuna: replies end with the
# tokenizer's EOS.
_MISTRAL = r"""{{- bos_token }}
{%- set ns = namespace(system='') %}
{%- for m in messages %}
    {%- if m.role == 'user' %}{{- '[INST] ' + ns.system + m.content + ' [/INST]' }}{%- set ns.system = '' %}
    {%- elif m.role == 'system' %}{%- set ns.system = m.content + '\n\n' %}
    {%- elif m.role == 'assistant' %}{{- m.content + eos_token }}
    {%- else %}{{- wrong_role(m.role) }}
    {%- endif %}
{%- endfor %}"""

_ALPACA = r"""{%- for m in messages %}
    {%- if m.role == 'system' %}{{- m.content + '\n\n' }}
    {%- elif m.role == 'user' %}{{- '### Instruction:\n' + m.content + '\n\n' }}
    {%- elif m.role == 'assistant' %}{{- '### Response:\n' + m.content + eos_token + '\n\n' }}
    {%- else %}{{- wrong_role(m.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '### Response:\n' }}{%- endif %}"""

_VICUNA = r"""{%- for m in messages %}
    {%- if m.role == 'system' %}{{- m.content + ' ' }}
    {%- elif m.role == 'user' %}{{- 'USER: ' + m.content + ' ' }}
    {%- elif m.role == 'assistant' %}{{- 'ASSISTANT: ' + m.content + eos_token }}
    {%- else %}{{- wrong_role(m.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- 'ASSISTANT:' }}{%- endif %}"""

_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

TEMPLATES: dict[str, Template] = {
    "chatml": Template(_named("chatml", _chatml(None)), stop="<|im_end|>", tokens=_CHATML_TOKENS),
    "qwen": Template(
        _named("qwen", _chatml("You are a helpful assistant.")), stop="<|im_end|>", tokens=_CHATML_TOKENS
    ),
    "qwen3": Template(_named("qwen3", _QWEN3), stop="<|im_end|>", tokens=_CHATML_TOKENS),
    "internlm2": Template(
        _named("internlm2", _chatml(None, bos=True)), stop="<|im_end|>", tokens=_CHATML_TOKENS
    ),
    "llama3": Template(
        _named("llama3", _LLAMA3),
        stop="<|eot_id|>",
        tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "llama2": Template(_named("llama2", _LLAMA2)),
    "gemma": Template(
        _named("gemma", _GEMMA), stop="<end_of_turn>", tokens=("<start_of_turn>", "<end_of_turn>")
    ),
    "phi3": Template(
        _named("phi3", _PHI3), stop="<|end|>", tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
    ),
    "glm4": Template(
        _named("glm4", _GLM4),
        stop="<|user|>",
        tokens=("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>"),
    ),
    "mistral": Template(_named("mistral", _MISTRAL)),
    "alpaca": Template(_named("alpaca", _ALPACA)),
    "vicuna": Template(_named("vicuna", _VICUNA)),
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
    missing = [t for t in (*template.tokens, template.stop) if t is not None and not _has_token(tokenizer, t)]
    if template.stop is not None and template.stop in missing:
        raise UserError(
            f"data.template {choice} ends turns with {template.stop}, which this tokenizer does not have "
            "as one token; use a template that ends turns with the EOS token (alpaca, vicuna, llama2, mistral)"
        )
    if missing:
        raise UserError(
            f"data.template {choice} writes {', '.join(missing)}, which this tokenizer does not have as "
            "single tokens: it is meant for another model family; pick the template of this model's family"
        )
    if template.stop is not None:
        tokenizer.eos_token = template.stop  # generation then stops where the template ends a turn
    tokenizer.chat_template = template.jinja


def _has_token(tokenizer: Any, token: str) -> bool:
    token_id = tokenizer.convert_tokens_to_ids(token)
    return token_id is not None and token_id != tokenizer.unk_token_id
