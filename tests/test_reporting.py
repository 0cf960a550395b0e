import pytest

from medrobust.reporting import format_eps, plot_curves, read_csv, summary_markdown, write_csv, write_summary_section
from medrobust.reporting import robustness
from medrobust.reporting.robustness import radius_rows


def _rows():
    rows = []
    for epoch in (0, 1):
        for attack in ("fgsm_linf", "pgd10_linf"):
            for eps, acc in ((0.0, 0.9), (0.004, 0.6 - 0.1 * (attack == "pgd10_linf")), (0.008, 0.3)):
                rows.append({"epoch": epoch, "split": "val", "attack": attack, "norm": "linf", "eps": eps,
                             "eps_unit": "model", "metric": "accuracy", "value": acc + 0.01 * epoch})
    return rows


def test_format_eps_has_no_dots():
    assert format_eps(0.004) == "0p004"
    assert format_eps(0.0) == "0"
    assert "." not in format_eps(1e-05)


def test_csv_round_trip(tmp_path):
    rows = _rows()
    write_csv(rows, tmp_path / "robustness.csv")
    back = read_csv(tmp_path / "robustness.csv")
    assert back == [{**row, "points": "", "flags": "", "sample": ""} for row in rows]


def test_radius_rows_round_trip_and_stay_out_of_curves_and_summary(tmp_path):
    radii = radius_rows([0.5, float("inf")], epoch=1, split="val", attack="fmn-curve_linf", norm="linf",
                        eps_unit="model")
    write_csv(_rows() + radii, tmp_path / "robustness.csv")
    back = [r for r in read_csv(tmp_path / "robustness.csv") if r["metric"] == "radius"]
    assert [(r["sample"], r["value"], r["eps"]) for r in back] == [(0, 0.5, ""), (1, float("inf"), "")]
    assert {p.name for p in plot_curves(_rows() + radii, tmp_path / "curves", split="val")} == {
        "fgsm_linf_accuracy.png", "pgd10_linf_accuracy.png"}
    assert summary_markdown(_rows() + radii, "val", title="t") == summary_markdown(_rows(), "val", title="t")


def test_curves_one_png_per_attack_and_metric(tmp_path):
    paths = plot_curves(_rows(), tmp_path / "curves", split="val")
    assert sorted(p.name for p in paths) == ["fgsm_linf_accuracy.png", "pgd10_linf_accuracy.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_summary_uses_last_epoch_and_one_clean_row():
    text = summary_markdown(_rows(), "val", title="t")
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| attack | eps | accuracy |"
    assert table[1] == "| clean | 0 | 0.9100 |"
    assert "| pgd10_linf | 0.004 | 0.5100 |" in table
    assert len(table) == 1 + 1 + 4  # header, clean, 2 attacks x 2 eps
    assert "epoch 1" in text
    assert "- pgd10_linf at eps=0.008: accuracy 0.3100 vs 0.9100 clean (34 % survives)" in text


def test_sub_metric_families_share_one_png(tmp_path):
    rows = [{"epoch": 0, "split": "test", "attack": "pgd10_linf", "norm": "linf", "eps": eps, "eps_unit": "range",
             "metric": metric, "value": value}
            for eps in (0.0, 0.004) for metric, value in
            (("age_shift", eps * 100), ("age_shift_lt50", eps * 50), ("age_shift_gt50", eps * 150), ("mae", 5.0))]
    names = {p.name for p in plot_curves(rows, tmp_path, split="test")}
    assert names == {"pgd10_linf_age_shift.png", "pgd10_linf_age_shift_by_part.png", "pgd10_linf_mae.png"}


def test_plot_y_limits_follow_bounded(tmp_path, monkeypatch):
    ylims = {}

    def save(fig, path):
        ylims[path.name] = fig.axes[0].get_ylim()
        robustness.plt.close(fig)
        return path

    monkeypatch.setattr(robustness, "_save", save)
    rows = [{**row, "metric": "mae", "value": 10 * row["value"]} for row in _rows()]
    plot_curves(_rows() + rows, tmp_path, split="val", bounded=("accuracy",))
    assert ylims["fgsm_linf_accuracy.png"] == robustness.BOUNDED_YLIM
    assert ylims["fgsm_linf_mae.png"][1] > 9  # autoscaled to the values (up to 9.1), not fixed
    ylims.clear()
    plot_curves(_rows(), tmp_path, split="val")  # nothing bounded unless the caller says so
    assert ylims["fgsm_linf_accuracy.png"] != robustness.BOUNDED_YLIM


def test_summary_sentences_name_the_tasks_metrics():
    rows = [{**row, "metric": "dice"} for row in _rows()] + [
        {**row, "metric": "age_shift", "value": 2.5 * row["eps"] / 0.004} for row in _rows()]
    text = summary_markdown(rows, "val", title="t", success_metric="dice", shift_metric="age_shift")
    assert ("- pgd10_linf at eps=0.008: dice 0.3100 vs 0.9100 clean (34 % survives); predictions shift by 5.00 "
            "on average") in text
    assert "predictions shift" not in summary_markdown(rows, "val", title="t", success_metric="dice")
    assert "survives" not in summary_markdown(rows, "val", title="t")  # no accuracy rows: no sentence


def test_summary_sections_give_one_summary_whoever_writes_first(tmp_path):
    table, universal = "# Robustness summary\n\n| a | b |\n", "## Universal perturbations\n\n| x |\n"
    for name, writes in (("a", [("robustness", table), ("universal_shift", universal)]),
                         ("b", [("universal_shift", universal), ("robustness", table)])):
        for section, text in writes:
            write_summary_section(tmp_path / name, section, text)
    first, second = ((tmp_path / name / "summary.md").read_text() for name in ("a", "b"))
    assert first == second == table + "\n" + universal  # the robustness table first, a blank line between
    write_summary_section(tmp_path / "a", "robustness", "# Robustness summary, again\n")  # replaces, not appends
    assert (tmp_path / "a" / "summary.md").read_text() == "# Robustness summary, again\n\n" + universal
    write_summary_section(tmp_path / "a", "robustness", "# Moved last\n", order=99)
    assert (tmp_path / "a" / "summary.md").read_text() == universal + "\n# Moved last\n"


@pytest.mark.parametrize("name, order, match", [
    ("../x", None, "section name must be letters, digits, '_' or '-', got '../x'"),
    ("notes", 1000, "order must be an int in \\[0, 999\\], got 1000 for section 'notes'"),
])
def test_summary_section_errors_quote_the_value(tmp_path, name, order, match):
    with pytest.raises(ValueError, match=match):
        write_summary_section(tmp_path, name, "text", order=order)
