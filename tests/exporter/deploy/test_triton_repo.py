"""Triton Inference Server repository entries: the config parses, batching follows the routing groups,
dims leave out the batch axis, the plan is copied whole, JIT-plugin engines are refused.

Neither ``tritonclient`` nor Triton's ``model_config.proto`` is a dependency. Each config is parsed
twice: by protobuf's text-format parser against a run-time subset of ModelConfig (same field names,
types and enum names as Triton's), and by the small parser below, whose result the tests inspect."""

from __future__ import annotations

import re

import pytest

from exporter import settings
from exporter.deploy.triton_repo import IOSpec, default_preferred_batches, write_triton_repo
from exporter.errors import UserError

# ModelConfig / ModelInput / ModelOutput / ModelInstanceGroup / ModelDynamicBatching fields used here.
KNOWN_FIELDS = {
    "name",
    "platform",
    "backend",
    "max_batch_size",
    "input",
    "output",
    "data_type",
    "dims",
    "reshape",
    "shape",
    "instance_group",
    "kind",
    "count",
    "dynamic_batching",
    "preferred_batch_size",
    "max_queue_delay_microseconds",
}
_TOKEN = re.compile(r'\s+|#[^\n]*|(?P<tok>"(?:[^"\\]|\\.)*"|[A-Za-z_][A-Za-z0-9_]*|-?\d+|[{}\[\]:,])')


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format -> {field: [values]}; messages become dicts, scalars str/int."""
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        assert m, f"cannot tokenize at {text[pos : pos + 30]!r}"
        if m.group("tok"):
            tokens.append(m.group("tok"))
        pos = m.end()
    tokens.append(None)
    i = 0

    def scalar():
        nonlocal i
        tok = tokens[i]
        i += 1
        if tok.startswith('"'):
            return re.sub(r"\\(.)", r"\1", tok[1:-1])
        return int(tok) if re.fullmatch(r"-?\d+", tok) else tok

    def value():
        nonlocal i
        if tokens[i] == "{":
            i += 1
            msg = message("}")
            i += 1
            return msg
        return scalar()

    def message(end) -> dict:
        nonlocal i
        out: dict = {}
        while tokens[i] != end:
            name = tokens[i]
            assert re.fullmatch(r"[A-Za-z_]\w*", name), f"expected a field name, got {name!r}"
            i += 1
            if tokens[i] == ":":
                i += 1
            if tokens[i] == "[":
                i += 1
                while tokens[i] != "]":
                    out.setdefault(name, []).append(value())
                    if tokens[i] == ",":
                        i += 1
                i += 1
                out.setdefault(name, [])
            else:
                out.setdefault(name, []).append(value())
        return out

    return message(None)


def field_names(msg) -> set[str]:
    names = set()
    for key, values in msg.items():
        names.add(key)
        for v in values:
            if isinstance(v, dict):
                names |= field_names(v)
    return names


def read_config(entry) -> dict:
    """The config as {field: [values]}, after protobuf's text-format parser accepted it."""
    from google.protobuf import text_format

    text = (entry.path / "config.pbtxt").read_text()
    text_format.Parse(text, model_config_class()())
    config = parse_pbtxt(text)
    assert field_names(config) <= KNOWN_FIELDS
    assert config["platform"] == ["tensorrt_plan"] and config["name"] == [entry.model_name]
    assert config["instance_group"] == [{"kind": ["KIND_GPU"], "count": [1]}]
    return config


def tensors(config, kind) -> dict:
    return {t["name"][0]: (t["data_type"][0], t["dims"]) for t in config[kind]}


def model_config_class():
    """A ModelConfig message class with the subset of Triton's model_config.proto these configs use
    (same field names, types and enum names), built at run time: protobuf's own text-format parser then
    checks the syntax, the field types and the enum values."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="triton_model_config_subset.proto", package="inference")
    data_types = ["INVALID", "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"]
    data_types += ["FP16", "FP32", "FP64", "STRING", "BF16"]
    enum = file.enum_type.add(name="DataType")
    for number, name in enumerate(data_types):
        enum.value.add(name=f"TYPE_{name}", number=number)

    def message(name, *fields):
        msg = file.message_type.add(name=name)
        for number, (field, kind, label, type_name) in enumerate(fields, start=1):
            f = msg.field.add(name=field, number=number, type=kind, label=label)
            if type_name:
                f.type_name = f".inference.{type_name}"
        return msg

    one, many = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message("ModelTensorReshape", ("shape", F.TYPE_INT64, many, None))
    tensor = [
        ("name", F.TYPE_STRING, one, None),
        ("data_type", F.TYPE_ENUM, one, "DataType"),
        ("dims", F.TYPE_INT64, many, None),
        ("reshape", F.TYPE_MESSAGE, one, "ModelTensorReshape"),
    ]
    message("ModelInput", *tensor)
    message("ModelOutput", *tensor)
    group = message(
        "ModelInstanceGroup", ("kind", F.TYPE_ENUM, one, "ModelInstanceGroup.Kind"), ("count", F.TYPE_INT32, one, None)
    )
    kind = group.enum_type.add(name="Kind")
    for number, name in enumerate(["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"]):
        kind.value.add(name=name, number=number)
    message(
        "ModelDynamicBatching",
        ("preferred_batch_size", F.TYPE_INT32, many, None),
        ("max_queue_delay_microseconds", F.TYPE_UINT64, one, None),
    )
    message(
        "ModelConfig",
        ("name", F.TYPE_STRING, one, None),
        ("platform", F.TYPE_STRING, one, None),
        ("backend", F.TYPE_STRING, one, None),
        ("max_batch_size", F.TYPE_INT32, one, None),
        ("input", F.TYPE_MESSAGE, many, "ModelInput"),
        ("output", F.TYPE_MESSAGE, many, "ModelOutput"),
        ("instance_group", F.TYPE_MESSAGE, many, "ModelInstanceGroup"),
        ("dynamic_batching", F.TYPE_MESSAGE, one, "ModelDynamicBatching"),
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


IMAGES = IOSpec("images", "float32", [-1, 3, 32, 32])


def test_soft_moe_entry_batches_dynamically_without_the_batch_axis_in_dims(tmp_path):
    engine = tmp_path / "soft.engine"
    engine.write_bytes(bytes(range(256)) * 1000)
    entry = write_triton_repo(
        tmp_path / "repo",
        "soft-moe-tiny",
        engine_path=engine,
        inputs=[IMAGES],
        outputs=[
            IOSpec("logits", "float16", [None, 10]),
            IOSpec("label", "int64", [-1]),
            IOSpec("ok", "bool", [-1, 4]),
        ],
        max_batch=32,
        batch_multiple=1,
        plugins="aot",
    )
    assert entry.complete and entry.dynamic_batching and entry.max_batch_size == 32
    assert (entry.path / "1" / "model.plan").read_bytes() == engine.read_bytes()
    assert sorted(entry.files) == ["1/model.plan", "README.txt", "config.pbtxt"]
    config = read_config(entry)
    assert config["max_batch_size"] == [32]
    assert tensors(config, "input") == {"images": ("TYPE_FP32", [3, 32, 32])}
    outputs = tensors(config, "output")
    assert outputs == {"logits": ("TYPE_FP16", [10]), "label": ("TYPE_INT64", [1]), "ok": ("TYPE_BOOL", [4])}
    assert [o["reshape"] for o in config["output"] if o["name"] == ["label"]] == [[{"shape": []}]]
    batcher = config["dynamic_batching"][0]
    assert batcher["preferred_batch_size"] == default_preferred_batches(32) == [16, 32]
    assert batcher["max_queue_delay_microseconds"] == [settings.TRITON_MAX_QUEUE_DELAY_US]
    text = (entry.path / "config.pbtxt").read_text()
    assert "no plugin library" in text and "TensorRT >= 10.9" in text
    readme = (entry.path / "README.txt").read_text()
    assert f"tritonserver --model-repository={(tmp_path / 'repo').resolve()}" in readme
    assert "perf_analyzer -m soft-moe-tiny -b 1 --shape images:3,32,32" in readme
    d = entry.to_dict()
    assert d["path"] == str(entry.path) and d["complete"] is True and d["notes"] == entry.notes


def test_explicit_preferred_batches_and_queue_delay(tmp_path):
    entry = write_triton_repo(
        tmp_path,
        "m",
        engine_path=None,
        inputs=[IOSpec("x", "fp16", [-1, 8])],
        outputs=[IOSpec("y", "float32", [-1, 8])],
        max_batch=8,
        batch_multiple=1,
        plugins="none",
        preferred_batches=[8, 2, 4, 4],
        queue_delay_us=0,
    )
    batcher = read_config(entry)["dynamic_batching"][0]
    assert batcher == {"preferred_batch_size": [2, 4, 8], "max_queue_delay_microseconds": [0]}
    assert "Plugins: none" in (entry.path / "config.pbtxt").read_text()


def test_vmoe_groups_of_8_get_no_dynamic_batching_and_a_group_multiple_batch(tmp_path):
    engine = tmp_path / "vmoe.plan"
    engine.write_bytes(b"plan")
    entry = write_triton_repo(
        tmp_path / "repo",
        "vmoe",
        engine_path=engine,
        inputs=[IMAGES],
        outputs=[IOSpec("logits", "float32", [-1, 10])],
        max_batch=60,
        batch_multiple=8,
        plugins="none",
    )
    assert entry.complete and not entry.dynamic_batching
    assert entry.max_batch_size == 56 and entry.max_batch_size % 8 == 0
    config = read_config(entry)
    assert "dynamic_batching" not in config and config["max_batch_size"] == [56]
    assert tensors(config, "input") == {"images": ("TYPE_FP32", [3, 32, 32])}
    text = (entry.path / "config.pbtxt").read_text()
    assert "dynamic_batching" not in text.split("\n\n", 1)[1]  # only the comment names it
    assert "multiple of 8" in text
    assert any("whole groups" in n and "multiple of 8" in n for n in entry.notes)
    assert any("max_batch_size is 56" in n for n in entry.notes)
    assert "perf_analyzer -m vmoe -b 8 " in (entry.path / "README.txt").read_text()


@pytest.mark.parametrize(
    ("max_batch", "preferred", "match"),
    [(4, None, "cannot hold one routing group"), (16, [8], "dynamic batching")],
)
def test_vmoe_groups_refuse_impossible_batching(tmp_path, max_batch, preferred, match):
    with pytest.raises(UserError, match=match):
        write_triton_repo(
            tmp_path,
            "vmoe",
            engine_path=None,
            inputs=[IMAGES],
            outputs=[IOSpec("logits", "float32", [-1, 10])],
            max_batch=max_batch,
            batch_multiple=8,
            plugins="aot",
            preferred_batches=preferred,
        )
    assert list(tmp_path.iterdir()) == []


def test_static_batch_engine_gets_max_batch_size_0_and_full_shapes(tmp_path):
    entry = write_triton_repo(
        tmp_path,
        "fixed",
        engine_path=None,
        inputs=[IOSpec("images", "float32", [8, 3, 32, 32])],
        outputs=[IOSpec("logits", "float32", [8, 10])],
        max_batch=8,
        batch_multiple=8,
        plugins="aot",
    )
    config = read_config(entry)
    assert config["max_batch_size"] == [0] and "dynamic_batching" not in config
    assert tensors(config, "input") == {"images": ("TYPE_FP32", [8, 3, 32, 32])}
    assert "perf_analyzer -m fixed --shape images:8,3,32,32" in (entry.path / "README.txt").read_text()


def test_jit_plugins_are_refused_before_anything_is_written(tmp_path):
    engine = tmp_path / "e.plan"
    engine.write_bytes(b"plan")
    with pytest.raises(UserError, match="JIT.*Python.*AOT"):
        write_triton_repo(
            tmp_path / "repo",
            "vmoe",
            engine_path=engine,
            inputs=[IMAGES],
            outputs=[IOSpec("logits", "float32", [-1, 10])],
            max_batch=8,
            batch_multiple=8,
            plugins="jit",
        )
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"plugins": "cuda"}, "not one of"),
        ({"model_name": "a/b"}, "model name"),
        ({"inputs": [IOSpec("images", "complex64", [-1, 3])]}, "no Triton type"),
        ({"inputs": [IOSpec("images", "float32", [-1, 0])]}, "dim 0"),
        ({"outputs": [IOSpec("images", "float32", [-1, 10])]}, "repeat"),
        ({"outputs": [IOSpec("logits", "float32", [4, 10])]}, "batch axis"),
        ({"engine_path": "/nonexistent/e.plan"}, "does not exist"),
        ({"preferred_batches": [64]}, "1..32"),
        ({"queue_delay_us": -1}, "queue delay"),
    ],
)
def test_bad_arguments_are_user_errors(tmp_path, changes, match):
    kwargs = dict(
        model_name="m",
        engine_path=None,
        inputs=[IMAGES],
        outputs=[IOSpec("logits", "float32", [-1, 10])],
        max_batch=32,
        batch_multiple=1,
        plugins="aot",
    )
    kwargs.update(changes)
    with pytest.raises(UserError, match=match):
        write_triton_repo(tmp_path / "repo", kwargs.pop("model_name"), **kwargs)
    assert not (tmp_path / "repo").exists()


def test_without_an_engine_the_entry_is_incomplete(tmp_path):
    entry = write_triton_repo(
        tmp_path,
        "soft",
        engine_path=None,
        inputs=[IMAGES],
        outputs=[IOSpec("logits", "float32", [-1, 10])],
        max_batch=16,
        batch_multiple=1,
        plugins="none",
    )
    assert not entry.complete and entry.to_dict()["complete"] is False
    assert not (entry.path / "1" / "model.plan").exists()
    assert sorted(entry.files) == ["README.txt", "config.pbtxt"]
    assert any("model.plan was not written" in n for n in entry.notes)
    assert "not servable" in (entry.path / "README.txt").read_text()
    read_config(entry)


def test_overwriting_an_entry_replaces_its_files_and_leaves_no_temp_files(tmp_path):
    first, second = tmp_path / "a.plan", tmp_path / "b.plan"
    first.write_bytes(b"first engine")
    second.write_bytes(b"second, longer engine")
    kwargs = dict(inputs=[IMAGES], outputs=[IOSpec("logits", "float32", [-1, 10])], batch_multiple=8, plugins="aot")
    write_triton_repo(tmp_path / "repo", "vmoe", engine_path=first, max_batch=8, **kwargs)
    entry = write_triton_repo(tmp_path / "repo", "vmoe", engine_path=second, max_batch=16, **kwargs)
    assert (entry.path / "1" / "model.plan").read_bytes() == second.read_bytes()
    assert read_config(entry)["max_batch_size"] == [16]
    files = sorted(str(p.relative_to(entry.path)) for p in entry.path.rglob("*"))
    assert files == ["1", "1/model.plan", "README.txt", "config.pbtxt"]

    # a later write without an engine keeps the old plan but says it may not match
    entry = write_triton_repo(tmp_path / "repo", "vmoe", engine_path=None, max_batch=8, **kwargs)
    assert not entry.complete and any("earlier write" in n for n in entry.notes)
    assert not [p for p in (tmp_path / "repo").rglob("*") if p.name.endswith(".tmp")]


def test_the_protobuf_check_rejects_what_triton_would():
    from google.protobuf import text_format

    ModelConfig = model_config_class()
    text_format.Parse(
        '# c\nname: "m" max_batch_size: 8 input [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] } ]', ModelConfig()
    )
    for bad in ("data_type: TYPE_FLOAT32", "max_batch_size: 8.5", "dynamic_batching { preferred: 4 }"):
        with pytest.raises(text_format.ParseError):
            text_format.Parse(bad if not bad.startswith("data") else f"input {{ {bad} }}", ModelConfig())


def test_names_with_quotes_are_escaped(tmp_path):
    entry = write_triton_repo(
        tmp_path,
        "m",
        engine_path=None,
        inputs=[IOSpec('in"put\\0', "float32", [-1, 2])],
        outputs=[IOSpec("out:0", "float32", [-1, 2])],
        max_batch=4,
        batch_multiple=1,
        plugins="none",
    )
    config = read_config(entry)
    assert set(tensors(config, "input")) == {'in"put\\0'} and set(tensors(config, "output")) == {"out:0"}
