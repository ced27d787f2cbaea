"""`data.tokenizer=hf:FOLDER`: `python -m pytest tests/data/test_hf_tokenizer.py`.

A Hugging Face tokenizer folder (made here from a trained BPE, as transformers saves one) tokenizes exactly as the
BPE inside it and trains SFT; a folder that ships tokenizer code runs it only with data.trust_remote_code=true; a
folder missing its files is refused naming them.
"""
from __future__ import annotations

import json

import pytest

from scimoe.config import ConfigError
from scimoe.data import chat
from scimoe.data.sft import synthetic_conversations
from scimoe.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_bpe
from scimoe.train.pretrain import pretrain
from tests.conftest import tiny_config

REMOTE = '''from transformers import PreTrainedTokenizerFast


class ShoutingTokenizer(PreTrainedTokenizerFast):
    """A folder's own tokenizer class: upper-cases text first."""

    def encode(self, text, *args, **kwargs):
        return super().encode(text.upper(), *args, **kwargs)
'''


def _folder(tmp_path, remote: bool = False):
    from transformers import PreTrainedTokenizerFast

    texts = [chat.text(chat.render(c["messages"], c.get("tools"))) for c in synthetic_conversations(64, 0)]
    bpe = train_bpe(texts + [t.upper() for t in texts], 384)
    folder = tmp_path / ("remote" if remote else "plain")
    PreTrainedTokenizerFast(tokenizer_object=bpe, additional_special_tokens=SPECIAL_TOKENS).save_pretrained(str(folder))
    if remote:
        (folder / "tokenization_shouting.py").write_text(REMOTE)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["auto_map"] = {"AutoTokenizer": [None, "tokenization_shouting.ShoutingTokenizer"]}
        config["tokenizer_class"] = "ShoutingTokenizer"
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder, bpe


def test_a_hf_folder_tokenizes_like_the_bpe_inside_it_and_trains_sft(tmp_path):
    folder, bpe = _folder(tmp_path)
    tok = load_tokenizer(f"hf:{folder}", 384)
    text = chat.text(chat.render([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True))
    assert tok.encode(text).ids == bpe.encode(text).ids and tok.token_to_id("<|im_end|>") == bpe.token_to_id("<|im_end|>")
    cfg = tiny_config(steps=2)
    cfg.recipe.name, cfg.data.source, cfg.data.synthetic_rows, cfg.data.tokenizer = "sft", "sft", 32, f"hf:{folder}"
    records = pretrain(cfg, str(tmp_path / "run")).records
    assert len(records) == 2 and not (tmp_path / "run" / "tokenizer.json").exists()  # no BPE trained: the folder's


def test_tokenizer_code_in_a_folder_runs_only_when_trusted(tmp_path):
    folder, bpe = _folder(tmp_path, remote=True)
    with pytest.raises(ConfigError, match=r"data\.trust_remote_code.*tokenization_shouting\.py"):
        load_tokenizer(f"hf:{folder}", 384)
    tok = load_tokenizer(f"hf:{folder}", 384, trust_remote_code=True)
    assert tok.encode("add two").ids == bpe.encode("ADD TWO").ids  # its own code ran


def test_a_folder_without_its_files_is_refused_by_name(tmp_path):
    folder, _ = _folder(tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="has no tokenizer.json, vocab.json"):
        load_tokenizer(f"hf:{folder}", 384)
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(ConfigError, match="tokenizer_config.json is missing"):
        load_tokenizer(f"hf:{folder}", 384)
    with pytest.raises(ConfigError, match="is missing"):
        load_tokenizer(f"hf:{tmp_path / 'nowhere'}", 384)


def test_sft_can_render_with_the_folders_own_chat_template(tmp_path):
    folder, _ = _folder(tmp_path)
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template  # a folder whose template writes no think blocks at all
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(f"hf:{folder}", 384)
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    segments = chat.render_with(tok.tok, messages)
    assert chat.text(segments) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    assert [t for t, trained in segments if trained] == ["4<|im_end|>"]
    cfg = tiny_config(steps=1)
    cfg.recipe.name, cfg.data.source, cfg.data.synthetic_rows, cfg.data.tokenizer = "sft", "sft", 16, f"hf:{folder}"
    cfg.sft.chat_template = "folder"
    assert len(pretrain(cfg, str(tmp_path / "run")).records) == 1
