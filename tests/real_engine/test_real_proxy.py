"""capbalancer serve relays real vLLM completions and chat, streaming and not, to the official openai
client, with usage intact; errors come back OpenAI-shaped."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.real_engine.conftest import VllmPair
from tests.real_engine.proxy import proxy
from tests.real_engine.server import SERVED_MODEL

pytestmark = pytest.mark.real_engine

PROMPT = "The quick brown fox jumps over the lazy dog and then"
NO_EOS = {"ignore_eos": True}  # a random-weight model may emit EOS at once; usage must then still say max_tokens


@pytest.fixture(scope="module")
def clients(vllm_pair: VllmPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[openai.OpenAI, openai.OpenAI]]:
    """(through the proxy, straight to the large backend)"""
    tmp = tmp_path_factory.mktemp("proxy")
    backends = {s.name: s.url for s in vllm_pair.both}
    with proxy(tmp, backends, "round_robin") as url:
        via = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        direct = openai.OpenAI(base_url=vllm_pair.large.base_url, api_key="unused", max_retries=0, timeout=60)
        yield via, direct


def test_models_listed_through_proxy(clients) -> None:
    via, _ = clients
    assert SERVED_MODEL in [m.id for m in via.models.list().data]


def test_completion_non_stream(clients) -> None:
    via, direct = clients
    # round_robin alternates: several requests reach both backends, and each must come back whole.
    for _ in range(4):
        resp = via.completions.create(model=SERVED_MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                      extra_body=NO_EOS)
        ref = direct.completions.create(model=SERVED_MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                        extra_body=NO_EOS)
        assert resp.id.startswith("cmpl-") and resp.object == "text_completion"
        assert resp.choices[0].finish_reason == "length"
        assert resp.choices[0].text == ref.choices[0].text  # same model, greedy: the same text either way
        assert resp.usage is not None and ref.usage is not None
        assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (ref.usage.prompt_tokens, 12)
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12


def test_completion_stream_with_usage(clients) -> None:
    via, direct = clients
    for _ in range(2):
        chunks = list(via.completions.create(model=SERVED_MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body=NO_EOS))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        ref = direct.completions.create(model=SERVED_MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                        extra_body=NO_EOS)
        assert text == ref.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        usage = chunks[-1].usage  # the final chunk carries usage and no choices
        assert chunks[-1].choices == [] and usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (ref.usage.prompt_tokens, 10)


def test_chat_non_stream_and_stream(clients) -> None:
    via, direct = clients
    messages = [{"role": "user", "content": "Say hello."}]
    for _ in range(2):
        resp = via.chat.completions.create(model=SERVED_MODEL, messages=messages, max_tokens=8, temperature=0,
                                           extra_body=NO_EOS)
        ref = direct.chat.completions.create(model=SERVED_MODEL, messages=messages, max_tokens=8,
                                             temperature=0, extra_body=NO_EOS)
        assert resp.object == "chat.completion" and resp.choices[0].message.role == "assistant"
        assert resp.choices[0].message.content == ref.choices[0].message.content
        assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (ref.usage.prompt_tokens, 8)

        chunks = list(via.chat.completions.create(model=SERVED_MODEL, messages=messages, max_tokens=8,
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True}, extra_body=NO_EOS))
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert content == ref.choices[0].message.content
        assert chunks[-1].usage is not None
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (ref.usage.prompt_tokens, 8)


def test_engine_error_passes_through(clients) -> None:
    via, _ = clients
    # max_tokens past the context: vLLM's own 400, relayed as is.
    with pytest.raises(openai.BadRequestError) as info:
        via.completions.create(model=SERVED_MODEL, prompt=PROMPT, max_tokens=5000)
    assert info.value.status_code == 400
    assert "max_tokens" in str(info.value.body)


def test_unknown_model_is_an_openai_404(clients) -> None:
    via, _ = clients
    with pytest.raises(openai.NotFoundError) as info:
        via.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=4)
    assert info.value.status_code == 404
