"""The JSON Schema: generated from the model, checked in, and in agreement with decode()."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from messagerie import MessageInvalide, from_dict
from messagerie.model import MESSAGE_TYPES, TOUS, Niveau, Statut
from messagerie.schema import json_schema, main, render
from tests.support.corpus import spec_example_object
from tests.support.strategies import json_values, wire_objects

CHECKED_IN = Path(__file__).resolve().parent.parent / "docs" / "schema" / "messagerie.schema.json"
REGENERATE = "python -m messagerie.schema > docs/schema/messagerie.schema.json"
VALIDATOR = jsonschema.Draft202012Validator(json_schema())
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def test_checked_in_schema_is_current() -> None:
    assert CHECKED_IN.read_text(encoding="utf-8") == render(), (
        f"{CHECKED_IN.name} is stale; regenerate it with: {REGENERATE}")


def test_rendering_is_stable_and_sorted() -> None:
    text = render()
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert json.loads(text) == json_schema()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True,
                              ensure_ascii=False) + "\n"


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_schema_follows_the_model() -> None:
    schema = json_schema()
    defs = schema["$defs"]
    assert schema["oneOf"] == [{"$ref": f"#/$defs/{t}"} for t in MESSAGE_TYPES]
    for kind, cls in MESSAGE_TYPES.items():
        assert defs[kind]["properties"]["type"] == {"const": kind}
        assert defs[kind]["additionalProperties"] is True
        assert defs[f"{kind}_payload"]["additionalProperties"] is True
        destination = defs[kind]["properties"]["destination"]["$ref"]
        assert destination.endswith("destination" if cls.broadcastable else "name")
    assert defs["journal_payload"]["properties"]["niveau"]["enum"] == [n.value for n in Niveau]
    assert defs["reponse_payload"]["properties"]["statut"]["enum"] == [s.value for s in Statut]


@pytest.mark.integration
def test_module_runs_cleanly() -> None:
    # The documented regeneration command: same text, and no runpy warning (which appears
    # when the package __init__ imports messagerie.schema, so it does not).
    done = subprocess.run([sys.executable, "-W", "error", "-m", "messagerie.schema"],
                          capture_output=True, text=True, check=False, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == render()


def test_main_writes_stdout_or_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert capsys.readouterr().out == render()
    target = tmp_path / "s.json"
    assert main([str(target)]) == 0
    assert target.read_text(encoding="utf-8") == render()
    assert main(["--help"]) == 2
    assert main(["a", "b"]) == 2


@pytest.mark.parametrize("obj", [
    spec_example_object(),
    {"type": "commande", "source": "vm-ui", "destination": "dom0",
     "payload": {"id": "1", "commande": "lister", "arguments": None}},
    {"type": "reponse", "source": "dom0", "destination": "vm-ui",
     "payload": {"id": "1", "commande": "lister", "statut": "erreur",
                 "erreur": {"code": "refuse", "message": "non", "detail": 1}}},
    {"type": "reponse", "source": "dom0", "destination": "vm-ui",  # erreur ignored when ok
     "payload": {"id": "1", "commande": "lister", "statut": "ok", "erreur": 1}},
    {"type": "journal", "source": "vm-ui", "destination": "tous", "trace": 1,
     "payload": {"niveau": "debug", "texte": "", "horodatage": "2024-01-01T00:00:00+01:00",
                 "composant": "ui"}},
])
def test_samples_validate(obj: dict[str, Any]) -> None:
    from_dict(obj)
    VALIDATOR.validate(obj)


@pytest.mark.parametrize(("obj", "why"), [
    ({"type": "commande", "source": "vm-ui", "destination": "tous",
      "payload": {"id": "1", "commande": "lister"}}, "commande broadcast"),
    ({"type": "notification", "source": "tous", "destination": "vm-ui",
      "payload": {"categorie": "c", "evenement": "e"}}, "tous as source"),
    ({"type": "reponse", "source": "dom0", "destination": "vm-ui",
      "payload": {"id": "1", "commande": "lister", "statut": "erreur"}}, "erreur missing"),
    ({"type": "journal", "source": "vm-ui", "destination": "dom0",
      "payload": {"niveau": "info", "texte": "", "horodatage": "2024-01-01T00:00:00",
                  "composant": "ui"}}, "no offset"),
    ({"type": "evenement", "source": "vm-ui", "destination": "dom0", "payload": {}}, "type"),
])
def test_invalid_samples_fail(obj: dict[str, Any], why: str) -> None:
    with pytest.raises(MessageInvalide):
        from_dict(obj)
    assert not VALIDATOR.is_valid(obj), why


@SETTINGS
@given(wire_objects())
def test_generated_messages_validate(obj: dict[str, Any]) -> None:
    VALIDATOR.validate(obj)


INTERESTING = st.sampled_from([
    1, 2.5, True, None, [], {}, [1], {"k": 1}, "", " ", "tous", "dom0", "vm-a", "-x", "a b",
    "é", "x" * 64, "x" * 65, "ok", "erreur", "info", "fatal", "c:d/e", "2024-01-01T00:00:00Z",
    "2024-01-01T00:00:00", "٢٠٢٤-01-01T00:00:00Z", "notification", "commande", "reponse",
    "journal",
])
# Python's re.search lets "$" match before a final newline where ECMA-262 does not;
# jsonschema uses re.search, so strings ending in "\n" are left out here.
VALUES = INTERESTING | json_values.filter(lambda v: not (isinstance(v, str) and
                                                         v.endswith("\n")))
DELETE = object()


def accepted(obj: dict[str, Any]) -> bool:
    try:
        from_dict(obj)
    except MessageInvalide:
        return False
    return True


@pytest.mark.slow
@settings(SETTINGS, max_examples=400)
@given(wire_objects(), st.data())
def test_schema_and_decoder_agree_on_mutations(obj: dict[str, Any], data: st.DataObject) -> None:
    obj = copy.deepcopy(obj)
    for _ in range(data.draw(st.integers(1, 2))):
        target = obj
        keys = ["type", "source", "destination", "payload"]
        if data.draw(st.booleans()) and isinstance(obj.get("payload"), dict):
            target = obj["payload"]
            keys = sorted({*target, "id", "commande", "statut", "erreur", "categorie",
                           "evenement", "data", "arguments", "niveau", "horodatage",
                           "composant", "texte", "resultat"})
            if isinstance(target.get("erreur"), dict) and data.draw(st.booleans()):
                target, keys = target["erreur"], ["code", "message"]
        key = data.draw(st.sampled_from(keys))
        value = data.draw(st.just(DELETE) | VALUES)
        if value is DELETE:
            target.pop(key, None)
        else:
            target[key] = value
    assert VALIDATOR.is_valid(obj) == accepted(obj), obj


def test_destination_tous_only_where_broadcastable() -> None:
    for kind, cls in MESSAGE_TYPES.items():
        obj = {"type": kind, "source": "vm-a", "destination": TOUS, "payload": {
            "id": "1", "commande": "c", "statut": "ok", "categorie": "c", "evenement": "e",
            "niveau": "info", "texte": "t", "horodatage": "2024-01-01T00:00:00Z",
            "composant": "c"}}
        assert VALIDATOR.is_valid(obj) is cls.broadcastable is accepted(obj)
