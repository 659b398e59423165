"""Run manifests: TOML and canonical forms, owner signatures, tampering, references, DHT records, selection."""

from __future__ import annotations

import dataclasses
import hashlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator_free_dht.errors import ValidationError
from coordinator_free_dht.identity import Identity
from coordinator_free_dht.validation import DHTRecord, OwnerValidator, SchemaValidator
from volunteer.errors import ManifestError
from volunteer.run.manifest import (
    FINGERPRINT_CHARS,
    MAX_MANIFEST_BYTES,
    PROTOCOL_VERSION,
    AveragingSpec,
    BuiltinData,
    ExpertsSpec,
    Manifest,
    ModelSpec,
    OptimizerSpec,
    RunRef,
    ScheduleSpec,
    Shard,
    ShardedData,
    SignedManifest,
    default_manifest,
    fingerprint,
    manifest_from_toml,
    manifest_key,
    manifest_key_schemas,
    manifest_record,
    manifest_to_toml,
    select_manifest,
)

OWNER = Identity.from_seed(bytes(range(32)))
OTHER = Identity.from_seed(bytes(range(1, 33)))


def _shard(i: int) -> Shard:
    return Shard(f"https://data.example.org/set/{i}.vshard", 1000 + i, hashlib.sha256(bytes([i])).hexdigest())


def _sharded_manifest() -> Manifest:
    return Manifest(
        name="lm-shards",
        owner=OWNER.public_key,
        model=ModelSpec("tiny-lm", {"vocab_size": 128, "seq_len": 64}),
        data=ShardedData("language-model", {"vocab_size": 100, "seq_len": 32}, tuple(_shard(i) for i in range(3))),
        optimizer=OptimizerSpec("lamb", {"lr": 0.01}, ScheduleSpec("cosine", 10, 1000, 0.1)),
        averaging=AveragingSpec(mode="local", target_batch_size=8192),
        experts=ExpertsSpec((4, 8), k_best=2, k_min=1),
        seed=7,
        description="tokens over https",
    )


def _pack(obj: object) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


# --- forms ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["mlp", "tiny-lm"])
def test_default_manifest_round_trips_through_toml_bytes_and_signature(template: str) -> None:
    manifest = default_manifest("demo-run", template, OWNER.public_key, seed=3)
    text = manifest_to_toml(manifest)
    assert "# " in text  # commented for editing
    assert manifest_from_toml(text) == manifest
    assert Manifest.from_bytes(manifest.to_bytes()) == manifest
    signed = SignedManifest.sign(manifest, OWNER)
    assert SignedManifest.from_wire(signed.to_wire()).manifest == manifest


def test_sharded_manifest_with_experts_round_trips() -> None:
    manifest = _sharded_manifest()
    assert manifest_from_toml(manifest_to_toml(manifest)) == manifest
    assert Manifest.from_bytes(manifest.to_bytes()) == manifest
    assert manifest.data.total_bytes == sum(1000 + i for i in range(3))  # type: ignore[union-attr]


def test_configs_are_resolved_with_defaults_and_read_only() -> None:
    manifest = default_manifest("demo", "mlp", OWNER.public_key)
    assert set(manifest.model.config) == {"input_dim", "hidden_dim", "num_layers", "num_classes"}
    with pytest.raises(TypeError):
        manifest.model.config["hidden_dim"] = 3  # type: ignore[index]


def test_toml_accepts_integers_for_float_settings_but_the_wire_does_not() -> None:
    text = manifest_to_toml(default_manifest("demo", "mlp", OWNER.public_key)).replace("lr = 0.003", "lr = 1")
    assert manifest_from_toml(text).optimizer.params["lr"] == 1.0
    wire = default_manifest("demo", "mlp", OWNER.public_key).to_dict()
    wire["optimizer"]["params"]["lr"] = 1
    with pytest.raises(ManifestError, match=r"optimizer\.params\.lr: expected float, got int"):
        Manifest.from_bytes(_pack(wire))


def test_toml_owner_may_be_filled_in_but_must_match() -> None:
    text = manifest_to_toml(default_manifest("demo", "mlp", OWNER.public_key))
    without_owner = "\n".join(line for line in text.splitlines() if not line.startswith("owner ="))
    with pytest.raises(ManifestError, match="owner: missing"):
        manifest_from_toml(without_owner)
    assert manifest_from_toml(without_owner, owner=OTHER.public_key).owner == OTHER.public_key
    with pytest.raises(ManifestError, match="sign with the owner's identity"):
        manifest_from_toml(text, owner=OTHER.public_key)


def test_bad_toml_is_a_manifest_error() -> None:
    with pytest.raises(ManifestError, match="not valid TOML"):
        manifest_from_toml("name = [unclosed")


# --- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ('template = "mlp"', 'template = "resnet"'),
            "unknown model template 'resnet'; known model templates are: mlp, tiny-lm",
        ),
        (("hidden_dim = 256", "hidden_dim = 0"), r"model\.config\.hidden_dim: 0 is out of range"),
        (("hidden_dim = 256", "width = 256"), r"unknown key\(s\) width for 'mlp'"),
        (("hidden_dim = 256", "hidden_dim = true"), "expected int, got bool"),
        (('name = "adam"', 'name = "adagrad"'), "unknown optimizer 'adagrad'"),
        (("lr = 0.003", "lr = 0.0"), "must be above 0"),
        (('mode = "grad"', 'mode = "fedavg"'), "not one of grad, local"),
        (("batch_size = 32", "batch_size = 4096"), "must not exceed target_batch_size"),
        (('gradients = "adaptive"', 'gradients = "zip"'), "not one of adaptive"),
        (('kind = "builtin"', 'kind = "ftp"'), "use 'builtin' or 'shards'"),
        (('generator = "teacher"', 'generator = "tokens"'), r"unknown key\(s\) input_dim.* for 'tokens'"),
        (
            ("input_dim = 64 # features per sample (=", "input_dim = 32 # features per sample (="),
            "differs from the model's input_dim",
        ),
        (('name = "demo"', 'name = "Demo Run"'), "not a valid run name"),
        (("seed = 0", "seed = -1"), "seed: expected an integer"),
        (("protocol_version = 1", "protocol_version = 2"), "upgrade volunteer"),
        (("protocol_version = 1", "protocol_version = 0"), "ask the run's owner to republish"),
        (("seed = 0", "seed = 0\ncolour = 3"), r"unknown field\(s\) colour"),
        (("warmup_epochs = 0", "warmup_epochs = 20000"), "warmup_epochs must not exceed total_epochs"),
    ],
)
def test_bad_fields_name_what_and_how_to_fix(edit: tuple[str, str], message: str) -> None:
    text = manifest_to_toml(default_manifest("demo", "mlp", OWNER.public_key))
    assert edit[0] in text
    with pytest.raises(ManifestError, match=message):
        manifest_from_toml(text.replace(edit[0], edit[1], 1))


def test_language_model_data_may_be_smaller_than_the_model_but_not_larger() -> None:
    model = ModelSpec("tiny-lm", {"vocab_size": 64, "seq_len": 32})
    ok = Manifest("lm", OWNER.public_key, model, BuiltinData("tokens", {"vocab_size": 50, "seq_len": 16}))
    assert ok.data.config["vocab_size"] == 50
    with pytest.raises(ManifestError, match=r"data seq_len \(48\) exceeds the model's seq_len \(32\)"):
        Manifest("lm", OWNER.public_key, model, BuiltinData("tokens", {"vocab_size": 50, "seq_len": 48}))
    with pytest.raises(ManifestError, match="the data is for language-model but the model template 'mlp'"):
        Manifest("lm", OWNER.public_key, ModelSpec("mlp"), BuiltinData("tokens"))
    with pytest.raises(ManifestError, match="must be a multiple of n_heads"):
        ModelSpec("tiny-lm", {"d_model": 30, "n_heads": 4})


@pytest.mark.parametrize(
    ("shard", "message"),
    [
        (("ftp://x/1", 10, "0" * 64), "not an http"),
        (("https://x/1", 0, "0" * 64), "must be 1 byte to 1 TiB"),
        (("https://x/1", 10, "0" * 63), "64 lowercase hex"),
        (("https://x/1", 10, "A" * 64), "64 lowercase hex"),
        (("https://x /1", 10, "0" * 64), "not an http"),
    ],
)
def test_bad_shards_are_refused(shard: tuple[str, int, str], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Shard(*shard)


def test_duplicate_or_missing_shards_are_refused() -> None:
    with pytest.raises(ManifestError, match="same sha256"):
        ShardedData("classification", {}, (_shard(1), _shard(1)))
    with pytest.raises(ManifestError, match="list 1 to"):
        ShardedData("classification", {}, ())


def test_experts_section_is_validated() -> None:
    with pytest.raises(ManifestError, match="k_min must not exceed k_best"):
        ExpertsSpec((4,), k_best=2, k_min=3)
    with pytest.raises(ManifestError, match="1 to 4 dimensions"):
        ExpertsSpec(())
    with pytest.raises(ManifestError, match="from 1 to 4096"):
        ExpertsSpec((0, 4))


def test_schedule_factors() -> None:
    warm = ScheduleSpec("constant", warmup_epochs=3)
    assert [warm.factor(e) for e in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cosine = ScheduleSpec("cosine", 0, 100, 0.1)
    assert cosine.factor(0) == pytest.approx(1.0)
    assert cosine.factor(50) == pytest.approx(0.55)
    assert cosine.factor(100) == pytest.approx(0.1)
    assert cosine.factor(10_000) == pytest.approx(0.1)
    linear = ScheduleSpec("linear", 0, 10, 0.0)
    assert linear.factor(5) == pytest.approx(0.5)


# --- signatures and the wire --------------------------------------------------------------------------------


def test_tampered_payload_or_signature_is_refused() -> None:
    signed = SignedManifest.sign(default_manifest("demo", "mlp", OWNER.public_key), OWNER)
    payload = signed.payload.replace(b"demo", b"dems")
    with pytest.raises(ManifestError, match="tampered"):
        SignedManifest.from_wire({"manifest": payload, "signature": signed.signature})
    bad_sig = bytes([signed.signature[0] ^ 1]) + signed.signature[1:]
    with pytest.raises(ManifestError, match="tampered"):
        SignedManifest.from_wire({"manifest": signed.payload, "signature": bad_sig})


def test_only_the_owner_can_sign() -> None:
    with pytest.raises(ManifestError, match="only the owner can sign"):
        SignedManifest.sign(default_manifest("demo", "mlp", OWNER.public_key), OTHER)


def test_swapping_the_owner_key_breaks_the_signature() -> None:
    signed = SignedManifest.sign(default_manifest("demo", "mlp", OWNER.public_key), OWNER)
    forged = default_manifest("demo", "mlp", OTHER.public_key).to_bytes()
    with pytest.raises(ManifestError, match="does not verify"):
        SignedManifest.from_wire({"manifest": forged, "signature": signed.signature})


def test_non_canonical_encodings_are_refused_even_when_signed() -> None:
    manifest = default_manifest("demo", "mlp", OWNER.public_key)
    obj = manifest.to_dict()
    reordered = _pack(dict(reversed(list(obj.items()))))
    signature = OWNER.sign(b"volunteer/manifest/v1\x00" + reordered)
    with pytest.raises(ManifestError, match="canonical"):
        SignedManifest.from_wire({"manifest": reordered, "signature": signature})
    # a missing field that has a default is also not canonical
    del obj["description"]
    with pytest.raises(ManifestError, match="description: missing"):
        Manifest.from_bytes(_pack(obj))


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"bytes",
        {"manifest": b"x"},
        {"manifest": b"x", "signature": b"y", "extra": 1},
        {"manifest": "text", "signature": bytes(64)},
        {"manifest": b"\xc1", "signature": bytes(64)},
        {"manifest": _pack([1, 2]), "signature": bytes(64)},
        {"manifest": _pack({"owner": b"short"}), "signature": bytes(64)},
        {"manifest": bytes(MAX_MANIFEST_BYTES + 1), "signature": bytes(64)},
    ],
)
def test_garbage_from_the_network_is_a_manifest_error(value: object) -> None:
    with pytest.raises(ManifestError):
        SignedManifest.from_wire(value)


def test_future_protocol_version_is_reported_after_the_signature_checks() -> None:
    obj = default_manifest("demo", "mlp", OWNER.public_key).to_dict()
    obj["protocol_version"] = PROTOCOL_VERSION + 1
    payload = _pack(obj)
    signature = OWNER.sign(b"volunteer/manifest/v1\x00" + payload)
    with pytest.raises(ManifestError, match=rf"needs protocol version {PROTOCOL_VERSION + 1}.*upgrade"):
        SignedManifest.from_wire({"manifest": payload, "signature": signature})


def test_too_many_shards_do_not_fit() -> None:
    shards = tuple(
        Shard(f"https://data.example.org/{'x' * 200}/{i}", 10, hashlib.sha256(str(i).encode()).hexdigest())
        for i in range(1000)
    )
    manifest = dataclasses.replace(
        _sharded_manifest(), data=ShardedData("language-model", {"vocab_size": 100, "seq_len": 32}, shards)
    )
    with pytest.raises(ManifestError, match="over the limit"):
        manifest.to_bytes()


@settings(max_examples=40, deadline=None)
@given(
    lr=st.floats(min_value=1e-6, max_value=10.0, allow_nan=False),
    seed=st.integers(min_value=0, max_value=(1 << 63) - 1),
    target=st.integers(min_value=64, max_value=1 << 30),
    description=st.text(max_size=100),
)
def test_any_valid_manifest_survives_every_form(lr: float, seed: int, target: int, description: str) -> None:
    manifest = dataclasses.replace(
        default_manifest("prop", "mlp", OWNER.public_key),
        optimizer=OptimizerSpec("sgd", {"lr": lr, "momentum": 0.9, "nesterov": True}),
        averaging=AveragingSpec(target_batch_size=target),
        seed=seed,
        description=description,
    )
    assert Manifest.from_bytes(manifest.to_bytes()) == manifest
    assert manifest_from_toml(manifest_to_toml(manifest)) == manifest


# --- references, keys and selection -------------------------------------------------------------------------


def test_fingerprint_is_a_prefix_of_the_peer_id() -> None:
    fp = fingerprint(OWNER.public_key)
    assert len(fp) == FINGERPRINT_CHARS
    assert str(OWNER.peer_id).startswith(fp)
    assert default_manifest("demo", "mlp", OWNER.public_key).reference == f"demo@{fp}"


def test_run_references() -> None:
    fp = fingerprint(OWNER.public_key)
    assert RunRef.parse("demo") == RunRef("demo")
    pinned = RunRef.parse(f"demo@{fp.upper()}")
    assert pinned == RunRef("demo", fp)
    assert str(pinned) == f"demo@{fp}"
    assert pinned.matches(OWNER.public_key)
    assert not pinned.matches(OTHER.public_key)
    assert RunRef.parse(f"demo@{OWNER.peer_id}").matches(OWNER.public_key)
    for bad in ("Demo", "demo@short", f"demo@{fp}1", "demo@" + "1" * 16, "@" + fp, ""):
        with pytest.raises(ManifestError):
            RunRef.parse(bad)


def _entries(*signed: SignedManifest) -> dict[str, dict[str, bytes]]:
    return {manifest_record(s).subkey: s.to_wire() for s in signed}


def test_select_manifest() -> None:
    mine = SignedManifest.sign(default_manifest("demo", "mlp", OWNER.public_key), OWNER)
    theirs = SignedManifest.sign(default_manifest("demo", "tiny-lm", OTHER.public_key), OTHER)
    fp_mine, fp_theirs = fingerprint(OWNER.public_key), fingerprint(OTHER.public_key)

    assert select_manifest(RunRef("demo"), _entries(mine)).manifest == mine.manifest
    assert select_manifest(RunRef("demo", fp_theirs), _entries(mine, theirs)).manifest == theirs.manifest
    with pytest.raises(ManifestError, match=r"several owners.*NAME@FINGERPRINT"):
        select_manifest(RunRef("demo"), _entries(mine, theirs))
    with pytest.raises(ManifestError, match=rf"not from owner {fp_theirs}.*found: {fp_mine}"):
        select_manifest(RunRef("demo", fp_theirs), _entries(mine))
    with pytest.raises(ManifestError, match="no run named 'demo' was found"):
        select_manifest(RunRef("demo"), None)
    with pytest.raises(ManifestError, match="no run named"):
        select_manifest(RunRef("demo"), {})


def test_select_manifest_skips_invalid_entries_and_reports_them() -> None:
    mine = SignedManifest.sign(default_manifest("demo", "mlp", OWNER.public_key), OWNER)
    tampered = {"manifest": mine.payload.replace(b"demo", b"dems"), "signature": mine.signature}
    wrapped = type("ValueWithExpiration", (), {"value": mine.to_wire(), "expiration_time": 1.0})()
    garbage_key = manifest_record(SignedManifest.sign(default_manifest("demo", "mlp", OTHER.public_key), OTHER)).subkey
    assert select_manifest(RunRef("demo"), {manifest_record(mine).subkey: wrapped, garbage_key: tampered}).manifest == (
        mine.manifest
    )
    with pytest.raises(ManifestError, match="tampered"):
        select_manifest(RunRef("demo"), {garbage_key: tampered})
    # a valid manifest under another owner's subkey, or for another run name, does not count
    with pytest.raises(ManifestError, match="another owner's subkey"):
        select_manifest(RunRef("demo"), {garbage_key: mine.to_wire()})
    other_run = SignedManifest.sign(default_manifest("other", "mlp", OWNER.public_key), OWNER)
    with pytest.raises(ManifestError, match="was stored under 'demo'"):
        select_manifest(RunRef("demo"), _entries(other_run))


def test_dht_record_is_owner_protected_and_schema_checked() -> None:
    signed = SignedManifest.sign(default_manifest("demo", "mlp", OWNER.public_key), OWNER)
    record = manifest_record(signed)
    assert record.key == manifest_key("demo") == "volunteer/manifest/demo"
    dht_record = DHTRecord(_pack(record.key), _pack(record.subkey), _pack(record.value), 1e9)
    schemas = SchemaValidator(prefixes=manifest_key_schemas())
    schemas.validate(dht_record)
    signed_record = OwnerValidator(OWNER).sign(dht_record)
    OwnerValidator().validate(signed_record)
    with pytest.raises(ValidationError, match="only the owner"):
        OwnerValidator(OTHER).sign(dht_record)
    with pytest.raises(ValidationError, match="without a valid signature"):
        OwnerValidator().validate(dht_record)
    bad_value = dataclasses.replace(dht_record, value=_pack({"manifest": "text", "signature": b""}))
    with pytest.raises(ValidationError, match="expected bytes"):
        schemas.validate(bad_value)
    with pytest.raises(ManifestError):
        manifest_key("Bad Name")
