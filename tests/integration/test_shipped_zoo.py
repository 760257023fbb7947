"""The model family shipped inside the package: every model loads through the public loading code,
all share one tokenizer, and chat renders in the task format the experts were tuned on."""

from transformers import AutoTokenizer

from fusion_llm import FusionEngine
from fusion_llm.zoo import MODELS_DIR, read_manifest, zoo_config, zoo_info
from fusion_llm.zoo.task_families import TASKS


def test_every_shipped_model_has_the_one_shared_tokenizer():
    shipped = [r["name"] for r in zoo_info() if r["shipped"]]
    assert len(shipped) == 3 + 3 * len(TASKS) + 2  # bases, per-task experts, multi-task FTs
    reference = (MODELS_DIR / "tokenizer" / "tokenizer.json").read_bytes()
    for name in shipped:
        assert (MODELS_DIR / name / "tokenizer.json").read_bytes() == reference
        assert (MODELS_DIR / name / "model.safetensors").exists() or (
            MODELS_DIR / name / "adapter_model.safetensors"
        ).exists()
    assert read_manifest(MODELS_DIR)["scale"] == "full"


def test_all_experts_of_each_source_load_into_one_engine_and_fuse():
    for source, kind in (("small", "lora"), ("small", "full"), ("mid", "full")):
        engine = FusionEngine(zoo_config(list(TASKS), source=source, kind=kind))
        (generation,) = engine.generate("Question: What is 2 + 3?\nAnswer:", max_new_tokens=2)
        assert generation.experts == list(TASKS) and len(generation.alpha) == 2


def test_chat_renders_a_user_turn_as_a_task_question():
    tokenizer = AutoTokenizer.from_pretrained(MODELS_DIR / "small-trivia")
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "In which city does Grulfour Gemgrour live?"},
        {"role": "assistant", "content": "Semstain"},
        {"role": "user", "content": "What pet does he keep?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s>Answer briefly.\nQuestion: In which city does Grulfour Gemgrour live?\n"
        "Answer: Semstain\nQuestion: What pet does he keep?\nAnswer:"
    )
