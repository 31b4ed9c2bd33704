"""Semantic versions and version ranges: parsed once, ordered by SemVer 2.0 precedence."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from spina_fast._registry import VersionRange, parse_version
from spina_fast.registry.reference import admits, range_bounds, version_key


@pytest.mark.parametrize(("text", "key"), [
    ("1.2.3", (1, 2, 3, 1, ())),
    ("v1.2", (1, 2, 0, 1, ())),
    ("7", (7, 0, 0, 1, ())),
    ("1.0.0-alpha.1", (1, 0, 0, 0, ((1, "alpha"), (0, 1)))),
    ("1.0.0-x-y.7z", (1, 0, 0, 0, ((1, "x-y"), (1, "7z")))),
    ("1.2.3+build.5", (1, 2, 3, 1, ())),
    ("4294967295.0.0", (4294967295, 0, 0, 1, ())),
])
def test_versions_parse_to_their_precedence_key(text: str, key: tuple) -> None:
    assert parse_version(text) == key


def test_keys_follow_the_semver_precedence_example() -> None:
    # SemVer 2.0 §11.4's chain, shuffled and sorted back.
    chain = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2", "1.0.0-beta.11",
             "1.0.0-rc.1", "1.0.0", "1.0.1", "1.1.0", "2.0.0"]
    assert sorted(reversed(chain), key=parse_version) == chain


@pytest.mark.parametrize("text", [
    "", "1.", "1..2", "a.b.c", "1.2.3.4", "01.2.3", "1.02", "1.2.3-", "1.2.3-01", "1.2.3-a..b", "1.2.3+",
    " 1.2.3", "1.2.3 ", "V1.2", "4294967296.0.0", "1.2.3-béta", "٣.1.0",
])
def test_bad_versions_are_refused_by_name(text: str) -> None:
    with pytest.raises(ValueError, match="version"):
        parse_version(text)


@pytest.mark.parametrize(("text", "admitted", "refused"), [
    (">=1.2,<2.0", ["1.2.0", "1.9.9", "1.2"], ["1.1.9", "2.0.0", "2.0.0-rc.1", "1.2.0-rc.1"]),
    (">=1.2 <2", ["1.5.0"], ["2.0.0"]),
    ("<2.0.0-rc.2", ["2.0.0-rc.1", "1.0.0"], ["2.0.0-rc.2", "2.0.0"]),
    ("<=2.0", ["2.0.0", "2.0.0-rc.1"], ["2.0.1"]),
    ("^1.2.3", ["1.2.3", "1.9.0"], ["1.2.2", "2.0.0", "2.0.0-alpha"]),
    ("^0.2.3", ["0.2.3", "0.2.9"], ["0.3.0", "0.2.2"]),
    ("^0.0.3", ["0.0.3"], ["0.0.4", "0.0.2"]),
    ("^0.0", ["0.0.9"], ["0.1.0"]),
    ("^0", ["0.9.9"], ["1.0.0"]),
    ("~1.2.3", ["1.2.3", "1.2.9"], ["1.3.0", "1.2.2"]),
    ("~1", ["1.9.9"], ["2.0.0"]),
    ("=1.2", ["1.2.0", "1.2.0+build"], ["1.2.1"]),
    ("1.2.3", ["1.2.3"], ["1.2.4"]),
    ("!=1.2.3", ["1.2.4", "1.2.3-rc.1"], ["1.2.3"]),
    (">1.0.0-beta.2", ["1.0.0-beta.11", "1.0.0"], ["1.0.0-beta", "1.0.0-alpha.9"]),
])
def test_ranges_admit_by_precedence(text: str, admitted: list[str], refused: list[str]) -> None:
    version_range = VersionRange(text)
    assert [version for version in admitted if version not in version_range] == []
    assert [version for version in refused if version in version_range] == []


@pytest.mark.parametrize("text", [
    "", "   ", ">=", ">=1.2,,<2", "1.2 || 2.0", ">=x", "=>1.2", "1.2 - 2.0", ">=1.2,<2,>0,<3,>1,<4,>2,<5,>3",
    "^4294967295",
])
def test_bad_ranges_are_refused_naming_the_range(text: str) -> None:
    with pytest.raises(ValueError, match="version range") as refused:
        VersionRange(text)
    assert repr(text) in str(refused.value)


numbers = st.integers(0, 3)
identifiers = st.one_of(st.integers(0, 12).map(str), st.sampled_from(["alpha", "beta", "rc", "x-y", "0a"]))
versions = st.builds(
    lambda prefix, parts, prerelease, build: prefix + ".".join(map(str, parts))
    + (f"-{'.'.join(prerelease)}" if prerelease else "") + (f"+{build}" if build else ""),
    st.sampled_from(["", "v"]), st.lists(numbers, min_size=1, max_size=3),
    st.lists(identifiers, max_size=3), st.sampled_from(["", "build.7"]),
)
comparators = st.builds(lambda operator, version: operator + version,
                        st.sampled_from(["", "=", "==", "!=", "<", "<=", ">", ">=", "^", "~"]), versions)


# Every range is checked against a dense grid too: a drawn range rarely meets, by chance, the one version
# that tells two readings of "~1.2" or "^0.2" apart.
GRID = [f"{major}.{minor}.{patch}{suffix}" for major in range(4) for minor in range(4) for patch in range(4)
        for suffix in ("", "-rc.1")]


@settings(max_examples=500)
@given(st.lists(comparators, min_size=1, max_size=3), st.lists(versions, max_size=4))
@example(["^0.2"], []).via("npm caret on 0.x")
@example(["^0.0.3"], []).via("npm caret on 0.0.x")
@example(["^0.0"], []).via("npm caret on 0.0")
@example(["~1.2"], []).via("tilde with a minor")
@example(["~1"], []).via("tilde without a minor")
@example([">=1.2", "<2.0"], []).via("PEP 440 exclusive upper bound")
def test_ranges_agree_with_the_reference_parser(range_parts: list[str], candidates: list[str]) -> None:
    text = ",".join(range_parts)
    version_range = VersionRange(text)
    bounds = range_bounds(text)
    for candidate in [*candidates, *GRID]:
        assert parse_version(candidate) == version_key(candidate)
        assert (candidate in version_range) == admits(bounds, version_key(candidate)), (text, candidate)
