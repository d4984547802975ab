"""The image layout is defined once (kdns/zone/layout.py) and every place agrees with it: the
C declarations (layout.pxd) restate it name for name, each struct's field offsets follow
from its fields' sizes, and the compilers and packet paths use it instead of own numbers."""
import re
import struct
from pathlib import Path

import pytest

from kdns.zone import encode, oracle, refpath
from kdns.zone import image as I
from kdns.zone import layout as L

KDNS = Path(__file__).resolve().parent.parent / "kdns"
_ENUM_ITEM = re.compile(r"^    ([A-Z][A-Z0-9_]*) = (0x[0-9A-Fa-f]+|\d+)\b", re.M)


def pxd_constants(path: Path) -> dict[str, int]:
    return {m.group(1): int(m.group(2), 0) for m in _ENUM_ITEM.finditer(path.read_text())}


def layout_constants() -> dict[str, int]:
    return {k: v for k, v in vars(L).items()
            if k.isupper() and isinstance(v, int) and not isinstance(v, bool)}


def test_the_pxd_restates_layout_py_name_for_name():
    assert pxd_constants(KDNS / "zone" / "layout.pxd") == layout_constants()


@pytest.mark.parametrize("name", sorted(L.FIELDS))
def test_each_offset_is_the_sum_of_the_sizes_before_it(name):
    st, size, fields = L.FIELDS[name]
    at = 0
    for off, code in fields:
        assert off == at, f"{name}: a field at {off}, but the fields before it end at {at}"
        at += struct.calcsize("<" + code)
    assert at == size == st.size
    assert st.format.replace(" ", "") == "<" + "".join(code for _, code in fields)


def test_the_extensions_keep_no_layout_numbers_of_their_own():
    # A layout name defined again in an extension's own enums would be a second definition
    # the pxd test above cannot see.
    names = set(layout_constants())
    for path in [KDNS / "packet" / "_fastpath.pxd", KDNS / "zone" / "_compile.pyx",
                 *(KDNS / "packet").glob("*.pyx"), *(KDNS / "packet").glob("*.pxi")]:
        assert not names & set(pxd_constants(path)), path


def test_the_compilers_and_the_reference_path_keep_no_structs_of_their_own():
    # A module-level struct with one of the layout's formats would be a second definition.
    formats = {st.format.replace(" ", ""): name for name, (st, _, _) in L.FIELDS.items()}
    for mod in (I, encode, oracle, refpath):
        for attr, value in vars(mod).items():
            if isinstance(value, struct.Struct) and value.format.replace(" ", "") in formats:
                assert value is getattr(L, formats[value.format.replace(" ", "")]), (mod, attr)


def test_a_header_read_by_name_in_both_packet_paths():
    try:
        from kdns.packet import _fastpath as fastpath
    except ImportError:
        from conftest import unavailable
        unavailable("the compiled packet path is not built")
    from zonefixtures import sample_image
    buf = bytearray(sample_image())
    serial = 0x1122334455667788
    struct.pack_into("<Q", buf, L.HEADER_SERIAL, serial)
    buf = bytes(buf)
    ref = refpath.Image(buf)
    assert (ref.nodes_off, ref.nnodes, ref.serial) == (
        L.HEADER_SIZE, struct.unpack_from("<I", buf, L.HEADER_NNODES)[0], serial)
    assert fastpath.Image(buf).serial == serial


def test_the_wire_pxd_restates_wire_py():
    # The extensions' type codes come from kdns/dns/wire.pxd; each must be wire.py's number.
    from kdns.dns import wire
    consts = pxd_constants(KDNS / "dns" / "wire.pxd")
    assert consts and consts == {k: getattr(wire, k) for k in consts}
    for path in [KDNS / "packet" / "_fastpath.pxd", KDNS / "zone" / "_compile.pyx",
                 *(KDNS / "packet").glob("*.pyx"), *(KDNS / "packet").glob("*.pxi")]:
        assert not set(consts) & set(pxd_constants(path)), path
