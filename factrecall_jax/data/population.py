"""The synthetic people of bioS (Allen-Zhu & Li, Physics of LMs 3.1): unique names and six independent attributes.

The pools are data files in `pools/`, one value per line, ASCII, no duplicates. Universities are real; employers are
invented, so a pretrained model cannot know an employer's city: each employer has one fixed city (employers.tsv) from
a pool of cities disjoint from the birth cities. Everything is a pure function of (num_people, seed).
"""
import dataclasses
import functools
import pathlib

import numpy as np

from factrecall_jax import errors

POOL_DIR = pathlib.Path(__file__).parent / "pools"
# The six facts of a person, in the fixed order of a biography's sentences (unless permuted).
ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "employer_city")
# Held-out QA fails in two different ways, so it is reported in two parts. A one-hop fact is stated right after the
# person is named (or He/She), so a question can reach it from the name alone. The employer's city is a property of
# the employer (a biography predicts it from the employer token): a held-out question about it needs name -> employer
# -> city, a composition of two facts.
ONE_HOP = ("birth_date", "birth_city", "university", "major", "employer")
COMPOSED, COMPOSED_VIA = "employer_city", "employer"  # the composed fact, and the fact it goes through
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
DAYS = 28  # every month has day 1-28, so month, day and year are drawn independently
FIRST_YEAR, YEARS = 1900, 100


@dataclasses.dataclass(frozen=True)
class Pools:
    female_first: tuple[str, ...]
    male_first: tuple[str, ...]
    middle: tuple[str, ...]
    last: tuple[str, ...]
    birth_city: tuple[str, ...]
    university: tuple[str, ...]
    major: tuple[str, ...]
    employer: tuple[str, ...]
    employer_city: dict[str, str]  # employer -> its one city

    @property
    def num_unique_names(self):
        return (len(self.female_first) + len(self.male_first)) * len(self.middle) * len(self.last)


def _read_lines(name):
    return tuple(line for line in (POOL_DIR / name).read_text(encoding="utf-8").splitlines() if line)


@functools.cache
def pools() -> Pools:
    employers = dict(line.split("\t") for line in _read_lines("employers.tsv"))
    return Pools(
        female_first=_read_lines("first_names_female.txt"),
        male_first=_read_lines("first_names_male.txt"),
        middle=_read_lines("middle_names.txt"),
        last=_read_lines("last_names.txt"),
        birth_city=_read_lines("birth_cities.txt"),
        university=_read_lines("universities.txt"),
        major=_read_lines("majors.txt"),
        employer=tuple(employers),
        employer_city=employers,
    )


@dataclasses.dataclass(frozen=True)
class Person:
    person_id: int
    first: str
    middle: str
    last: str
    female: bool
    birth_date: str
    birth_city: str
    university: str
    major: str
    employer: str
    employer_city: str

    @property
    def name(self):
        return f"{self.first} {self.middle} {self.last}"

    @property
    def pronoun(self):
        return "She" if self.female else "He"


def check_num_people(num_people):
    """Raises when the pools cannot give `num_people` distinct full names."""
    limit = pools().num_unique_names
    if not 1 <= num_people <= limit:
        raise errors.InvalidValue(f"num_people={num_people} is out of range: the name pools give between 1 and "
                                  f"{limit} unique full names (first x middle x last)")


def sample_people(num_people: int, seed: int) -> list[Person]:
    """The people table: person i has person_id i; names are unique, attributes uniform and independent.

    Names are drawn without replacement from the product of the pools by index, so no rejection loop is needed.
    Gender follows the first name (the female and male pools are the same size, so it is a fair coin).
    """
    check_num_people(num_people)
    p = pools()
    rng = np.random.default_rng([seed, 0])
    first_pool = p.female_first + p.male_first
    name_index = rng.choice(p.num_unique_names, size=num_people, replace=False)
    first, middle, last = np.unravel_index(name_index, (len(first_pool), len(p.middle), len(p.last)))
    month, day, year = (rng.integers(n, size=num_people) for n in (len(MONTHS), DAYS, YEARS))
    columns = {k: rng.integers(len(getattr(p, k)), size=num_people)
               for k in ("birth_city", "university", "major", "employer")}
    people = []
    for i in range(num_people):
        employer = p.employer[columns["employer"][i]]
        people.append(Person(
            person_id=i,
            first=first_pool[first[i]],
            middle=p.middle[middle[i]],
            last=p.last[last[i]],
            female=bool(first[i] < len(p.female_first)),
            birth_date=f"{MONTHS[month[i]]} {day[i] + 1}, {FIRST_YEAR + year[i]}",
            birth_city=p.birth_city[columns["birth_city"][i]],
            university=p.university[columns["university"][i]],
            major=p.major[columns["major"][i]],
            employer=employer,
            employer_city=p.employer_city[employer],
        ))
    return people
