"""A chat request's prompt is counted and keyed as the engine tokenizes it: the model's chat template (beside the
pool's tokenizer.json) rendered as transformers renders it, then tokenized without adding special tokens again.
Unit checks of the rendering, and the count seen in the scheduler's own accounting on real processes."""

from __future__ import annotations

import json

from test_tokenizer import held_kv_tokens
from tokenizers import Tokenizer, models, pre_tokenizers

from capbalancer.server.chat_template import ChatTemplate, plain_messages

# Word-level on purpose: every whitespace-separated word is one token, so counts are easy to read.
TEMPLATE = ("{{ bos_token }} {% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")


def model_folder(tmp_path, template: str | None = TEMPLATE, config: dict | None = None):
    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    if template is not None:
        (tmp_path / "chat_template.jinja").write_text(template)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        config if config is not None else {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>"}))
    return tmp_path / "tokenizer.json"


def test_the_template_renders_as_the_engine_would(tmp_path):
    t = ChatTemplate.beside(model_folder(tmp_path))
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    assert t.render(msgs) == "<s> system: be brief user: hi there assistant: "
    assert t.render(msgs, add_generation_prompt=False) == "<s> system: be brief user: hi there "
    # continue_final_message: the prompt stops at the end of the last message's content
    assert t.render([*msgs, {"role": "assistant", "content": "Sure, the"}], False, True) == (
        "<s> system: be brief user: hi there assistant: Sure, the")


def test_content_parts_trim_blocks_and_named_templates(tmp_path):
    assert plain_messages([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"},
                                                        {"type": "text", "text": "b"}]}]) == [
        {"role": "user", "content": "a\nb"}]
    assert plain_messages("nope") is None and plain_messages([1]) is None
    # tokenizer_config.json's own template (a list of named ones: "default"), rendered with trim_blocks
    folder = model_folder(tmp_path, template=None, config={"bos_token": "B", "chat_template": [
        {"name": "tool_use", "template": "x"},
        {"name": "default", "template": "{% for m in messages %}\n{{ m['content'] }}|{% endfor %}\n"}]})
    assert ChatTemplate.beside(folder).render([{"role": "user", "content": "q"}]) == "q|"


def test_a_template_that_cannot_be_used_falls_back_without_an_error(tmp_path):
    for name in ("broken", "refusing", "none"):
        (tmp_path / name).mkdir()
    assert ChatTemplate.beside(model_folder(tmp_path / "broken", template="{% for %}")) is None
    refusing = ChatTemplate.beside(model_folder(tmp_path / "refusing", template="{{ raise_exception('no') }}"))
    assert refusing is not None and refusing.render([{"role": "system", "content": "x"}]) is None
    assert ChatTemplate.beside(model_folder(tmp_path / "none", template=None)) is None  # no template at all


def test_a_chat_prompt_is_counted_through_the_models_template(tmp_path):
    words = " ".join(["supercalifragilistic"] * 50)
    body = {"model": "m", "messages": [{"role": "user", "content": words}], "max_tokens": 4, "stream": True}
    # <s>, "user:", 50 words, "assistant:" = 53 (the joined contents alone were 50)
    assert 53 <= held_kv_tokens(model_folder(tmp_path), "/v1/chat/completions", body) <= 55
