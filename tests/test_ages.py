"""Chronological age from DICOM attributes and the bone-age Z-score against the Greulich & Pyle reference."""

from __future__ import annotations

import pytest

from inference.ages import (
    DAYS_PER_MONTH,
    REFERENCE_AGES_MONTHS,
    REFERENCE_SD_MONTHS,
    chronological_age,
    compare_with_chronological_age,
    reference_sd_months,
)


def test_age_from_birth_and_study_dates() -> None:
    age = chronological_age("20150301", "20250301", None)
    assert age.months == pytest.approx(3653 / DAYS_PER_MONTH) and age.source == "PatientBirthDate and StudyDate"
    assert chronological_age("20150301", "20250301", "003Y").months == pytest.approx(120.0, abs=0.1), "dates first"


@pytest.mark.parametrize(
    ("patient_age", "months"),
    [("010Y", 120.0), ("018M", 18.0), ("026W", 26 * 7 / DAYS_PER_MONTH), ("060D", 60 / DAYS_PER_MONTH)],
)
def test_patient_age_serves_when_the_dates_do_not(patient_age: str, months: float) -> None:
    age = chronological_age(None, "20250301", patient_age)
    assert age.months == pytest.approx(months) and age.source == "PatientAge"


@pytest.mark.parametrize(
    ("birth", "study", "patient_age", "reason"),
    [
        (None, None, None, "PatientBirthDate is missing; StudyDate is missing; PatientAge is missing"),
        ("2015-03-01", "20250301", None, "PatientBirthDate is not a valid date; PatientAge is missing"),
        ("20150230", "20250301", "12Y", "PatientBirthDate is not a valid date; PatientAge is not a valid age string"),
        ("20250302", "20250301", "", "StudyDate is before PatientBirthDate; PatientAge is missing"),
    ],
)
def test_missing_or_malformed_dates_give_no_age_and_say_why(birth, study, patient_age, reason: str) -> None:
    age = chronological_age(birth, study, patient_age)
    assert age.months is None and age.source == reason


def test_the_reference_table_is_whole_and_interpolated_between_its_ages() -> None:
    assert len(REFERENCE_SD_MONTHS["M"]) == len(REFERENCE_AGES_MONTHS) == 24 and len(REFERENCE_SD_MONTHS["F"]) == 23
    assert reference_sd_months(120, "M") == 9.79 and reference_sd_months(120, "F") == 11.73
    assert reference_sd_months(126, "M") == pytest.approx((9.79 + 10.09) / 2)
    assert reference_sd_months(2, "M") is None
    assert reference_sd_months(204, "M") == 13.05 and reference_sd_months(204, "F") is None  # girls end at 16 years


def test_bone_age_beyond_the_flag_is_advanced_or_delayed() -> None:
    # at 10 years a boy's SD is 9.79 months: 2 SD is 19.6 months
    advanced = compare_with_chronological_age(140.0, 120.0, "M", flag_sds=2.0)
    assert advanced.difference_months == 20.0 and advanced.z_score == pytest.approx(20 / 9.79)
    assert advanced.assessment == "advanced"
    assert compare_with_chronological_age(101.0, 120.0, "M", 2.0).assessment == "within range"
    assert compare_with_chronological_age(100.0, 120.0, "M", 2.0).assessment == "delayed"
    assert compare_with_chronological_age(100.0, 120.0, "M", 3.0).assessment == "within range"


def test_outside_the_reference_there_is_a_difference_but_no_z_score() -> None:
    adult = compare_with_chronological_age(200.0, 240.0, "F", 2.0)
    assert adult.difference_months == -40.0 and adult.z_score is None and adult.assessment is None
