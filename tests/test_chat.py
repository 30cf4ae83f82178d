"""Model tokenizers (store/tokenizer.py), stop ids and chat templates (store/chat.py) (compared with transformers' renderings,
stored in the fixtures)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from store import chat
from store.tokenizer import ByteTokenizer, ModelTokenizer, byte_tokenizer_json, make_tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"
CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": "what is the capital of france?"}]


@pytest.mark.parametrize("name", ["llama3", "qwen2"])  # a Llama-3-style and a ChatML template
def test_chat_templates_render_and_tokenize_as_transformers_does(name):
    tok = ModelTokenizer.from_dir(FIXTURES / name)
    ref = np.load(FIXTURES / name / "reference.npz")
    text = chat.render_chat(tok.chat_template, CONVERSATION, tok.special_tokens)
    assert text == str(ref["chat"])
    assert tok.encode(text) == ref["chat_ids"].tolist()


def test_stop_ids_come_from_generation_config_then_tokenizer_config(tmp_path):
    tok = ModelTokenizer.from_dir(FIXTURES / "llama3")
    vocab = tok._tok.get_vocab()
    assert tok.stop_ids == [vocab["<|eot_id|>"], vocab["<|end_of_text|>"]]
    assert tok.stop_strings() == ["<|eot_id|>", "<|end_of_text|>"]
    assert tok.separator == [vocab["<|eot_id|>"]]
    d = tmp_path / "m"
    shutil.copytree(FIXTURES / "qwen2", d)
    (d / "generation_config.json").unlink()
    assert ModelTokenizer.from_dir(d).stop_ids == [vocab["<|im_end|>"]]  # tokenizer_config's eos_token


def test_prompts_get_the_tokenizers_bos_and_decode_drops_specials():
    tok = ModelTokenizer.from_dir(FIXTURES / "llama3")
    ids = tok.encode_prompt("hello there")
    assert ids[0] == tok._tok.token_to_id("<|begin_of_text|>") and ids[1:] == tok.encode("hello there")
    assert tok.decode_clean(ids) == "hello there"


def test_template_lists_chat_template_files_and_missing_templates(tmp_path):
    template = json.loads((FIXTURES / "qwen2" / "tokenizer_config.json").read_text())["chat_template"]
    cfg = {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]}
    tok = ModelTokenizer(FIXTURES / "qwen2" / "tokenizer.json", cfg)
    assert tok.chat_template == template
    d = tmp_path / "m"
    shutil.copytree(FIXTURES / "qwen2", d)
    (d / "chat_template.jinja").write_text("{{ messages[0]['content'] | upper }}")
    tok = ModelTokenizer.from_dir(d)
    assert chat.render_chat(tok.chat_template, CONVERSATION[1:]) == "HELLO THERE"
    with pytest.raises(chat.ChatError, match="no chat_template"):
        chat.render_chat(None, CONVERSATION)


def test_template_errors_and_raise_exception_are_chat_errors():
    with pytest.raises(chat.ChatError, match="only user roles"):
        chat.render_chat("{{ raise_exception('only user roles') }}", CONVERSATION)
    with pytest.raises(chat.ChatError):
        chat.render_chat("{% for %}", CONVERSATION)
    assert chat.render_chat("{{ messages | tojson }}", CONVERSATION[1:2]) == json.dumps(CONVERSATION[1:2])


def test_conversation_interleaves_turns_and_replies():
    messages = chat.conversation(["a", "b"], ["x"], system="s")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert [m["content"] for m in messages] == ["s", "a", "x", "b"]
    assert chat.conversation(["a"], []) == [{"role": "user", "content": "a"}]


def test_the_byte_tokenizer_json_is_mpx_byte_tokenizer(tmp_path):
    (tmp_path / "tokenizer.json").write_text(byte_tokenizer_json())
    tok = ModelTokenizer(tmp_path / "tokenizer.json")
    text = "héllo wörld\n\t ✓ 0x7f"
    assert tok.encode(text) == ByteTokenizer().encode(text)
    assert tok.decode(ByteTokenizer().encode(text)) == text and tok.vocab_size == 256


def test_make_tokenizer_reads_a_model_directory():
    tok = make_tokenizer(str(FIXTURES / "mistral"))
    assert isinstance(tok, ModelTokenizer) and tok.chat_template and tok.stop_ids


# --------------------------------------------------------------------------- serve.generate --chat


def _generate(capsys, *argv) -> tuple[int, str, str]:
    from serve import generate

    code = generate.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_chats_turn_by_turn_with_a_system_message(capsys):
    code, out, err = _generate(capsys, "--checkpoint", FIXTURES / "qwen2", "--precision", "fp32", "--max-tokens", "4",
                               "--system", "You are terse.", "--chat", "hello there", "--chat", "what is the capital?")
    assert code == 0, err
    assert out.count("user: ") == 2 and out.count("assistant: ") == 2
    assert out.index("user: hello there") < out.index("user: what is the capital?")
    assert "new tokens" in err


def test_generation_stops_at_the_checkpoints_end_of_turn_token(capsys, tmp_path):
    from serve import engine as engine_lib
    from serve import sources
    from serve import quantize as q

    model, variables, tok, _ = sources.load_for_serving(FIXTURES / "llama3", q.ServeSpec("fp32"))
    prompt = chat.render_chat(tok.chat_template, [{"role": "user", "content": "hello"}], tok.special_tokens)
    outputs, _ = engine_lib.Engine(model, variables).generate([tok.encode(prompt)], max_new_tokens=6)
    assert outputs[0].finish == "length"  # without a stop id it runs to --max-tokens
    first, second = outputs[0].tokens[:2]
    d = tmp_path / "m"
    shutil.copytree(FIXTURES / "llama3", d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [second]}))
    code, out, _ = _generate(capsys, "--checkpoint", d, "--precision", "fp32", "--max-tokens", "6", "--chat", "hello")
    assert code == 0 and out == f"user: hello\nassistant: {tok.decode([first])}\n"  # stopped at the second


@pytest.mark.parametrize("argv, message", [
    (["--chat", "hi", "--prompt", "x"], "give --prompt (plain text) or --chat (a conversation), one of the two"),
    (["--prompt", "x", "--system", "s"], "--system applies only to --chat"),
])
def test_generate_chat_option_mistakes_exit_2(capsys, argv, message):
    code, _, err = _generate(capsys, "--checkpoint", FIXTURES / "qwen2", *argv)
    assert code == 2 and err.strip() == f"error: {message}"


def test_generate_without_a_template_says_so(capsys, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(FIXTURES / "qwen2", d)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    code, _, err = _generate(capsys, "--checkpoint", d, "--precision", "fp32", "--chat", "hi")
    assert code == 2 and "no chat_template" in err and err.count("\n") == 1


def _fine_tuned_run(tmp_path: Path, source: Path) -> Path:
    """A training run's directory as `train.run` leaves it for a run started from `source`
    (`model.init_from`) with `data.tokenizer: SOURCE/tokenizer.json`: a checkpoint of the
    model and the tokenizer's files carried into the run."""
    from mpx import config as mpx_config
    from store import checkpoint as ckpt
    from store import hf
    from store.tokenizer import carry_tokenizer

    model = hf.load(source)
    run = tmp_path / "run"
    metadata = {"config": {"model": mpx_config.to_dict(model.config),
                           "data": {"tokenizer": str(source / "tokenizer.json")}}}
    ckpt.save(run / "checkpoints", 1, {"params": model.params}, metadata)
    carry_tokenizer(str(source / "tokenizer.json"), run)
    return run


def test_a_fine_tuned_run_keeps_its_models_chat_template(capsys, tmp_path):
    source = tmp_path / "qwen2"
    shutil.copytree(FIXTURES / "qwen2", source)
    run = _fine_tuned_run(tmp_path, source)
    shutil.rmtree(source)  # the run needs nothing of the directory it started from
    code, out, err = _generate(capsys, "--checkpoint", run, "--precision", "fp32", "--max-tokens", "3", "--chat", "hi")
    assert code == 0 and out.startswith("user: hi\nassistant: "), err


def test_without_a_template_the_refusal_points_to_the_tokenizer_option(capsys, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(FIXTURES / "qwen2", d)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    code, _, err = _generate(capsys, "--checkpoint", _fine_tuned_run(tmp_path, d), "--chat", "hi")
    assert code == 2 and "--tokenizer DIR" in err and err.count("\n") == 1
