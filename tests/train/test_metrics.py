from hwcompat.data.metrics import detect_kind, headline, score


def test_json_field_f1():
    refs = ['{"people": ["Ann", "Bo"], "places": ["Oslo"]}', '{"people": [], "places": ["Lima"]}']
    preds = ['{"people": ["Ann"], "places": ["Oslo", "Rome"]}', 'Sure! {"places": ["lima"]} hope it helps']
    m = score(preds, refs)
    # tp: Ann, Oslo, lima(case-insensitive) = 3; fp: Rome = 1; fn: Bo = 1
    assert m["field_precision"] == 0.75 and m["field_recall"] == 0.75 and m["field_f1"] == 0.75
    assert m["json_valid"] == 1.0 and m["exact_match"] == 0.0
    assert headline(m) == "field_f1=0.750"


def test_invalid_json_prediction_counts_as_missed():
    m = score(["not json"], ['{"a": "x"}'])
    assert m["json_valid"] == 0.0 and m["field_recall"] == 0.0 and m["field_f1"] == 0.0


def test_label_accuracy():
    refs = ["spam", "ham", "spam", "ham"]
    m = score(["Spam", "ham", "ham", " ham "], refs)
    assert detect_kind(refs) == "label" and m["accuracy"] == 0.75 and m["exact_match"] == 0.5


def test_free_text_is_exact_match():
    refs = [f"a long answer number {i} with many words" for i in range(30)]
    assert detect_kind(refs) == "exact"
    assert score(refs, refs)["exact_match"] == 1.0 and "accuracy" not in score(refs, refs)
