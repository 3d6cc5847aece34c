"""Golden losses: the tiny recipes' first steps give the stored losses and grad norms (exactly on
the reference build). Regenerate with ``make golden`` after an intended numerics change."""

import pytest

from tests.golden.cases import CASES, load_golden, mismatches, run_case


@pytest.mark.parametrize("case", sorted(CASES))
def test_losses_match_the_golden_values(workdir, case):
    measured = run_case(case, workdir)
    problems = mismatches(load_golden(case), measured)
    assert not problems, (f"{case}: numerics changed (if intended, run `make golden`):\n  "
                          + "\n  ".join(problems))


def test_a_numerics_change_is_caught(workdir):
    """Another init seed: every value moves, and the comparison says so."""
    measured = run_case("tiny_base", workdir, extra=("train.seed=4321",))
    problems = mismatches(load_golden("tiny_base"), measured)
    assert len(problems) == 2 * len(measured), problems
