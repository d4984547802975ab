"""The --from-file source: every shape kubectl prints, unknown kinds counted, clear errors."""
import json

import pytest

from kdns.kube.file import InputError, read_objects

SVC = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": "x"},
       "spec": {"clusterIP": "10.0.0.1"}}
NS = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}
CM = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_list_of_objects_in_yaml(tmp_path):
    import yaml
    path = write(tmp_path, "l.yaml", yaml.safe_dump({"kind": "List", "items": [SVC, NS, CM]}))
    objs, ignored = read_objects(path)
    assert [o["kind"] for o in objs] == ["Service", "Namespace"]
    assert ignored == {"ConfigMap": 1}


def test_multi_document_stream_with_empty_documents(tmp_path):
    import yaml
    text = "---\n" + yaml.safe_dump(SVC) + "---\n---\n" + yaml.safe_dump(CM) + "---\n" + yaml.safe_dump(CM)
    objs, ignored = read_objects(write(tmp_path, "s.yaml", text))
    assert objs == [SVC]
    assert ignored == {"ConfigMap": 2}


def test_json_object_list_and_array(tmp_path):
    nested = {"kind": "List", "items": [{"kind": "List", "items": [SVC]}, NS]}
    objs, _ = read_objects(write(tmp_path, "n.json", json.dumps(nested)))
    assert objs == [SVC, NS]
    objs, _ = read_objects(write(tmp_path, "a.json", json.dumps([SVC, CM])))
    assert objs == [SVC]


def test_typed_api_list_items_get_their_kind(tmp_path):
    """The API's ServiceList omits each item's kind; kubectl's List does not."""
    item = {k: v for k, v in SVC.items() if k != "kind"}
    objs, _ = read_objects(write(tmp_path, "t.json", json.dumps({"kind": "ServiceList", "items": [item]})))
    assert objs == [SVC]


def test_unknown_and_missing_kinds_are_counted(tmp_path):
    objs, ignored = read_objects(write(tmp_path, "u.json", json.dumps([CM, {"metadata": {}}])))
    assert objs == [] and ignored == {"ConfigMap": 1, "None": 1}


def test_a_kind_that_is_not_a_string_is_ignored_like_any_unknown_kind(tmp_path):
    # Found by the zone-file fuzz target: `kind in KINDS` hashed the mapping and raised.
    text = "kind:  {name: a}\nspec: {clusterIP: 10.96.0.9}\n---\n" + json.dumps(SVC) + "\n"
    objs, ignored = read_objects(write(tmp_path, "k.yaml", text))
    assert objs == [SVC] and ignored == {"(a dict)": 1}


@pytest.mark.parametrize("text", ["[" * 1100, "[" * 1100 + "]" * 1100, "- " * 2000 + "x\n"])
def test_nesting_deeper_than_the_parser_recurses_is_a_clear_error(tmp_path, text):
    # Found by the zone-file fuzz target: RecursionError escaped instead of InputError.
    with pytest.raises(InputError, match="nested too deeply|exceeded maximum nesting depth"):
        read_objects(write(tmp_path, "deep.json", text))


@pytest.mark.parametrize("text,needle", [
    ("kind: List\nitems: [\n", "invalid YAML at line"),
    ('{"kind": "List", "items": [}', "invalid JSON at line 1"),
    ("just a string\n", "found a str"),
    ("- 1\n- 2\n", "found a int"),
])
def test_invalid_input_is_one_sentence_naming_the_file(tmp_path, text, needle):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(InputError) as e:
        read_objects(path)
    msg = str(e.value)
    assert msg.startswith(path) and needle in msg and msg.endswith(".") and "\n" not in msg


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_objects(str(tmp_path / "nope.yaml"))
    with pytest.raises(InputError, match="cannot be read"):
        read_objects(str(tmp_path))                     # a directory
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00kind")
    with pytest.raises(InputError, match="cannot be read"):
        read_objects(str(binary))


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)
