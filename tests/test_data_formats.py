"""Format adapters: alpaca/sharegpt/openai rows become Conversations; problems say file:line: field."""

from __future__ import annotations

import json

import pytest

from tunelab.data.conversation import Conversation, ImagePart, Message, TextPart
from tunelab.data.formats import detect_format, read_conversations, to_conversation
from tunelab.errors import TunelabError


def roles_and_texts(conv: Conversation) -> list[tuple[str, str]]:
    return [(m.role, m.text) for m in conv.messages]


def test_alpaca_with_system_and_role_content_history_seed_003():
    row = {"instruction": "你觉得今天的天气怎么样?", "input": "", "output": "我觉得今天天气很好。", "system": "你是助手",
           "history": [{"role": "user", "content": "你好!"}, {"role": "assistant", "content": "你好!有什么可以帮你的吗?"}]}
    conv = to_conversation(row, "alpaca", source="d.json:1")
    assert roles_and_texts(conv) == [("system", "你是助手"), ("user", "你好!"), ("assistant", "你好!有什么可以帮你的吗?"),
                                     ("user", "你觉得今天的天气怎么样?"), ("assistant", "我觉得今天天气很好。")]
    assert [m.learn for m in conv.messages] == [False, False, True, False, True]
    assert conv.source == "d.json:1"


def test_alpaca_pairs_history_and_input_joined_and_null_history():
    conv = to_conversation({"instruction": "Translate", "input": "Hello", "output": "你好",
                            "history": [["q1", "a1"]]}, "alpaca")
    assert roles_and_texts(conv) == [("user", "q1"), ("assistant", "a1"), ("user", "Translate\nHello"),
                                     ("assistant", "你好")]
    seed_row = {"instruction": "孕妇感冒发烧38度应该怎么办呢", "input": "我怀孕了", "output": "多喝水", "history": None}
    assert len(to_conversation(seed_row, "alpaca").messages) == 2


@pytest.mark.parametrize("row, message", [
    ({"instruction": "q"}, "d.jsonl:7: output: missing"),
    ({"instruction": "q", "output": "  "}, "d.jsonl:7: output: the answer is empty"),
    ({"instruction": "q", "output": "a", "history": [["u", "a", "extra"]]},
     "d.jsonl:7: history[0]: expected a [user, assistant] pair, got 3 items"),
    ({"instruction": "q", "output": "a", "history": [{"role": "bot", "content": "x"}]},
     "d.jsonl:7: history[0].role: expected 'user' or 'assistant', got 'bot'"),
    ({"instruction": "q", "output": ["a"]}, "d.jsonl:7: output: expected text, got list"),
    ({"instruction": "", "input": "", "output": "a"}, "d.jsonl:7: instruction: empty (and input is empty too)"),
    ({"instruction": "q", "output": "a", "history": [{"role": "assistant", "content": "x"}]},
     "d.jsonl:7: output: message 1 is from 'assistant', expected 'user'"),
])
def test_alpaca_problems_name_source_and_field(row, message):
    with pytest.raises(TunelabError) as info:
        to_conversation(row, "alpaca", source="d.jsonl:7")
    assert str(info.value).startswith(message)


def test_sharegpt_with_system_turn_and_custom_tags():
    row = {"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "问"},
                             {"from": "gpt", "value": "答"}]}
    assert roles_and_texts(to_conversation(row, "sharegpt")) == [("system", "sys"), ("user", "问"), ("assistant", "答")]
    custom = {"dialog": [{"speaker": "patient", "text": "头疼"}, {"speaker": "doctor", "text": "休息"}]}
    conv = to_conversation(custom, "sharegpt", columns={"messages": "dialog"},
                           tags={"role_tag": "speaker", "content_tag": "text", "user_tag": "patient",
                                 "assistant_tag": "doctor"})
    assert roles_and_texts(conv) == [("user", "头疼"), ("assistant", "休息")]


@pytest.mark.parametrize("turns, message", [
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
     "f:2: conversations: message 2 is from 'user', expected 'assistant'"),
    ([{"from": "human", "value": "a"}], "f:2: conversations: the last message must be the assistant's answer"),
    ([{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}], "f:2: conversations[1].from: unknown role 'bot'"),
    ([{"from": "human"}, {"from": "gpt", "value": "b"}], "f:2: conversations[0].value: missing"),
    ([], "f:2: conversations: expected a non-empty list"),
])
def test_sharegpt_problems(turns, message):
    with pytest.raises(TunelabError) as info:
        to_conversation({"conversations": turns}, "sharegpt", source="f:2")
    assert str(info.value).startswith(message)


def test_openai_string_and_parts_content_with_images():
    row = {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}},
                                     {"type": "text", "text": "描述这张图"}]},
        {"role": "assistant", "content": "一只猫"}]}
    conv = to_conversation(row, "openai", base_dir="/data")
    assert conv.messages[0].content == [ImagePart("x.png"), TextPart("描述这张图")]
    assert conv.to_openai()[0]["content"][0] == {"type": "image_url", "image_url": {"url": "x.png"}}
    assert Conversation.from_openai(conv.to_openai()).messages == conv.messages


def test_images_column_fills_image_placeholders_relative_to_the_file():
    row = {"instruction": "<image>这是什么?", "output": "猫", "images": ["cat.png"]}
    conv = to_conversation(row, "alpaca", base_dir="/data")
    assert conv.messages[0].content == [ImagePart("/data/cat.png"), TextPart("这是什么?")]


def test_column_remapping_alpaca():
    conv = to_conversation({"question": "Q", "answer": "A", "ctx": "C"}, "alpaca",
                           columns={"prompt": "question", "query": "ctx", "response": "answer"})
    assert roles_and_texts(conv) == [("user", "Q\nC"), ("assistant", "A")]


def test_detect_format():
    assert detect_format({"instruction": "a", "output": "b"}) == "alpaca"
    assert detect_format({"conversations": [{"from": "human", "value": "x"}]}) == "sharegpt"
    assert detect_format({"messages": [{"role": "user", "content": "x"}]}) == "openai"
    assert detect_format({"question": "x"}) is None


def test_read_conversations_detects_and_collects_every_problem(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [{"instruction": "q1", "output": "a1"}, {"instruction": "q2"}, "broken",
             {"instruction": "q3", "output": "a3", "history": [["x"]]}, {"instruction": "q4", "output": "a4"}]
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) if isinstance(x, dict) else x for x in lines) + "\n",
                    encoding="utf-8")
    problems: list[str] = []
    convs = read_conversations(path, on_error=problems.append)
    assert [c.source for c in convs] == [f"{path}:1", f"{path}:5"]
    assert problems == [f"{path}:2: output: missing",
                        problems[1],
                        f"{path}:4: history[0]: expected a [user, assistant] pair, got 1 items"]
    assert problems[1].startswith(f"{path}:3: invalid JSON")
    with pytest.raises(TunelabError, match=r"d\.jsonl:2: output: missing"):
        read_conversations(path)


def test_unknown_keys_explain_the_expected_formats(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n', encoding="utf-8")
    with pytest.raises(TunelabError, match=r"d\.jsonl:1: cannot tell the format from the keys \(answer, question\)"):
        read_conversations(path)


def test_with_learning_policies():
    conv = Conversation([Message("user", "q1"), Message("assistant", "a1"), Message("user", "q2"),
                         Message("assistant", "a2")])
    assert [m.learn for m in conv.with_learning(mask_history=True).messages] == [False, False, False, True]
    assert all(m.learn for m in conv.with_learning(train_on_prompt=True).messages)
    assert [m.learn for m in conv.messages] == [False, True, False, True]  # the original is untouched


def test_chat_rows_under_either_key_and_shape():
    openai_under_conversations = {"conversations": [{"role": "user", "content": "q"},
                                                    {"role": "assistant", "content": "a"}]}
    sharegpt_under_messages = {"messages": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    sharegpt_user_roles = {"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]}
    for fmt in ("sharegpt", "openai"):
        for row in (openai_under_conversations, sharegpt_under_messages, sharegpt_user_roles):
            assert roles_and_texts(to_conversation(row, fmt)) == [("user", "q"), ("assistant", "a")]
    assert detect_format(sharegpt_under_messages) == "sharegpt"
    # explicit tags are honoured, not second-guessed
    with pytest.raises(TunelabError, match="conversations\\[0\\].from: unknown role 'human'"):
        to_conversation(sharegpt_user_roles | {"conversations": sharegpt_under_messages["messages"]}, "sharegpt",
                        tags={"user_tag": "patient", "assistant_tag": "doctor"})
