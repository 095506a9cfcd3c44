import messagerie

SPEC_EXAMPLE = (b'{"type":"notification","source":"vm-sys-usb","destination":"tous",'
                b'"payload":{"categorie":"device","evenement":"connect","chemin":"/mnt/usb_in"}}')


def test_spec_example_round_trips() -> None:
    msg = messagerie.decode(SPEC_EXAMPLE)
    assert isinstance(msg, messagerie.Notification)
    assert msg.payload["chemin"] == "/mnt/usb_in"
    assert messagerie.encode(msg) == SPEC_EXAMPLE + b"\n"
