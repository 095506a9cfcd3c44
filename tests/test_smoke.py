import messagerie
from tests.support.corpus import SPEC_EXAMPLE


def test_spec_example_round_trips() -> None:
    msg = messagerie.decode(SPEC_EXAMPLE)
    assert isinstance(msg, messagerie.Notification)
    assert msg.payload["chemin"] == "/mnt/usb_in"
    assert messagerie.encode(msg) == SPEC_EXAMPLE + b"\n"
