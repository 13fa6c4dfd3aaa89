"""Session.task_metrics: the steps task's per-step means, and accuracy by kind of response."""

from types import SimpleNamespace

import pytest

from agpo_megatron.data.synthetic_steps import analyze
from agpo_megatron.train.session import Session


def test_task_metrics_means_and_accuracy_by_kind():
    texts = ["well now 7+5=12 \\boxed{12}", "7+5=12 \\boxed{12}", "7+5=13 \\boxed{13}", "\\boxed{3}"]
    done = [SimpleNamespace(text=t, token_ids=[0] * (n + 1)) for t, n in zip(texts, (15, 11, 11, 3))]  # + EOS
    m = Session.task_metrics(SimpleNamespace(analyze=analyze), done, [True, True, False, False])
    assert m["waste_tokens"] == 1.0 and m["reasoning_tokens"] == pytest.approx((7 + 7 + 7 + 0) / 4)
    assert m["steps_present"] == 0.75 and m["other_tokens"] == pytest.approx((5 + 5 + 5 + 4) / 4)
    assert (m["acc_steps_waste"], m["acc_steps_no_waste"], m["acc_no_steps"]) == (1.0, 0.5, 0.0)
    assert m["waste_frac_with_steps"] == pytest.approx(1 / 3) and m["waste_frac_without_steps"] == 0.0
    assert "acc_no_steps" not in Session.task_metrics(SimpleNamespace(analyze=analyze), done[:1], [True])
    assert Session.task_metrics(SimpleNamespace(analyze=None), done, None) == {}
