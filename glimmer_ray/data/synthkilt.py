"""SynthKILT: a deterministic multi-task knowledge benchmark in KILT's formats, made without downloads.

It stands in for KILT on machines that cannot fetch it. A seeded world of fictional countries,
cities, organisations and people (names built from syllables, so no answer can come from outside
knowledge) is rendered as Wikipedia-like pages whose facts sit among filler sentences. Six tasks in
KILT's families ask about it, each with its own templates and gold provenance:

    nq, tqa      open QA in two styles (lower-case search query; trivia question)
    hotpotqa     two-hop QA whose evidence is two pages
    fever        claim verification, SUPPORTS / REFUTES (refuted claims use a plausible wrong value)
    zsre, trex   slot filling, `subject [SEP] relation`

Dev questions are about subjects never asked about in train, so answering needs retrieval. A `facts_seed`
gives a counterfactual twin: the same world with its facts dealt out again. Hard
negatives come by construction: many people share a birthplace, an employer or an occupation, and
every page states several facts of its entity.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any

from glimmer_ray.data.kilt import write_jsonl

VERSION = "1"
TASKS = ("nq", "tqa", "hotpotqa", "fever", "zsre", "trex")


@dataclass(frozen=True)
class Scale:
    countries: int
    cities: int
    organizations: int
    people: int
    train_per_task: int
    dev_per_task: int


SCALES = {
    "tiny": Scale(4, 12, 10, 40, 60, 20),  # tests: seconds
    "quickstart": Scale(6, 24, 24, 120, 400, 60),  # the quickstart: minutes on 2 CPU cores
    "small": Scale(12, 80, 80, 600, 3000, 300),
    "medium": Scale(30, 400, 500, 4000, 20000, 1000),
    "large": Scale(60, 2500, 4000, 30000, 100000, 3000),  # ~36k pages
}

_ONSETS = [
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "kr",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "st",
    "t",
    "tr",
    "v",
    "z",
    "th",
    "sh",
    "qu",
]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "ia"]
_CODAS = ["", "n", "r", "l", "s", "th", "nd", "rk", "m", "x"]
_OCCUPATIONS = [
    "architect",
    "botanist",
    "cartographer",
    "chemist",
    "composer",
    "engineer",
    "geologist",
    "historian",
    "linguist",
    "mathematician",
    "novelist",
    "painter",
    "physician",
    "sculptor",
    "astronomer",
    "economist",
]
_INDUSTRIES = [
    "shipbuilding",
    "textiles",
    "publishing",
    "mining",
    "banking",
    "aviation",
    "pharmaceuticals",
    "brewing",
    "telecommunications",
    "glassmaking",
    "railways",
    "insurance",
]
_FILLER = [
    "{name} is often mentioned in regional histories.",
    "Several archives preserve documents related to {name}.",
    "Local accounts describe {name} in considerable detail.",
    "The subject has been discussed in a number of essays.",
    "A small museum exhibit was once dedicated to {name}.",
    "Little is recorded about the early years in detail.",
    "Historians continue to debate several minor points.",
    "Contemporary newspapers reported on {name} from time to time.",
]


class _World:
    """The fictional world: entities with typed attributes and relations."""

    def __init__(self, scale: Scale, rng: random.Random) -> None:
        self.rng = rng
        self._used: set[str] = set()
        self.countries = [{"name": self._name(2, 3), "type": "country"} for _ in range(scale.countries)]
        self.cities = [{"name": self._name(2, 3), "type": "city"} for _ in range(scale.cities)]
        self.organizations = [
            {
                "name": self._name(2, 3) + " " + rng.choice(["Works", "Company", "Group", "Institute", "Society"]),
                "type": "organization",
            }
            for _ in range(scale.organizations)
        ]
        # Families of about four share a surname and mention each other: hard negatives for retrieval.
        families = [self._name(2, 3) for _ in range(max(2, scale.people // 4))]
        self.people = [
            {"name": self._name(2, 2) + " " + rng.choice(families), "type": "person"} for _ in range(scale.people)
        ]
        members: dict[str, list[str]] = {}
        for person in self.people:
            members.setdefault(person["name"].split(" ")[1], []).append(person["name"])
        for person in self.people:
            person["relatives"] = [name for name in members[person["name"].split(" ")[1]] if name != person["name"]][:3]
        for country in self.countries:
            country["currency"] = self._name(1, 2).lower() + " " + rng.choice(["crown", "mark", "florin", "thaler"])
            country["language"] = self._name(2, 2) + rng.choice(["ic", "ese", "ish"])
        for index, city in enumerate(self.cities):
            city["country"] = (
                self.countries[index % len(self.countries)]["name"]
                if index < len(self.countries)
                else rng.choice(self.countries)["name"]
            )
            city["founded"] = str(rng.randint(1100, 1899))
            city["river"] = self._name(2, 2) + " River"
        for country in self.countries:
            country["capital"] = rng.choice([c["name"] for c in self.cities if c["country"] == country["name"]])
        for person in self.people:
            person["born"] = str(rng.randint(1820, 1995))
            person["birthplace"] = rng.choice(self.cities)["name"]
            person["occupation"] = rng.choice(_OCCUPATIONS)
            person["employer"] = rng.choice(self.organizations)["name"]
        for organization in self.organizations:
            organization["founded"] = str(rng.randint(1700, 1990))
            organization["headquarters"] = rng.choice(self.cities)["name"]
            organization["industry"] = rng.choice(_INDUSTRIES)
            organization["founder"] = rng.choice(self.people)["name"]
        self.by_name = {e["name"]: e for e in self.countries + self.cities + self.organizations + self.people}

    def redeal_facts(self, rng: random.Random) -> None:
        """Deal each attribute's values out again among the entities of its type: the same names, words and
        distribution of facts, but (almost) every fact about an entity changed. Capitals are redrawn among
        each country's cities, so the world stays consistent."""
        for group, attributes in (
            (self.countries, ("currency", "language")),
            (self.cities, ("country", "founded", "river")),
            (self.people, ("born", "birthplace", "occupation", "employer")),
            (self.organizations, ("founded", "headquarters", "industry", "founder")),
        ):
            for attribute in attributes:
                values = [entity[attribute] for entity in group]
                rng.shuffle(values)
                for entity, value in zip(group, values):
                    entity[attribute] = value
        for country in self.countries:  # the shuffle keeps every country's number of cities (at least one)
            country["capital"] = rng.choice([c["name"] for c in self.cities if c["country"] == country["name"]])

    def _name(self, low: int, high: int) -> str:
        while True:
            syllables = self.rng.randint(low, high)
            name = "".join(
                self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS) for _ in range(syllables)
            ).capitalize()
            if name not in self._used and len(name) > 3:
                self._used.add(name)
                return name


def _fact_paragraphs(entity: dict[str, Any]) -> list[tuple[str | tuple[str, ...], list[str]]]:
    """Per paragraph: the attribute(s) it states (their gold provenance) and its fact sentences."""
    n = entity["name"]
    if entity["type"] == "person":
        return [
            ("occupation", [f"{n} (born {entity['born']}) is a {entity['occupation']}."]),
            (("birthplace", "born"), [f"{n} was born in {entity['birthplace']} in {entity['born']}."]),
            ("employer", [f"{n} has worked for {entity['employer']} for many years."]),
            ("relatives", [f"{n} is a relative of {', '.join(entity['relatives'])}."] if entity["relatives"] else []),
        ]
    if entity["type"] == "city":
        return [
            ("country", [f"{n} is a city in {entity['country']}."]),
            ("founded", [f"{n} was founded in {entity['founded']}."]),
            ("river", [f"The {entity['river']} flows through {n}."]),
        ]
    if entity["type"] == "organization":
        return [
            ("industry", [f"{n} is an organisation active in {entity['industry']}."]),
            (("founded", "founder"), [f"{n} was founded in {entity['founded']} by {entity['founder']}."]),
            ("headquarters", [f"The headquarters of {n} are in {entity['headquarters']}."]),
        ]
    return [
        ("capital", [f"{n} is a country whose capital is {entity['capital']}."]),
        ("language", [f"The official language of {n} is {entity['language']}."]),
        ("currency", [f"The currency of {n} is the {entity['currency']}."]),
    ]


def _render_page(
    entity: dict[str, Any], wikipedia_id: str, rng: random.Random
) -> tuple[dict[str, Any], dict[str, int]]:
    """A KILT knowledge-source page; returns it and the paragraph index of each attribute."""
    paragraphs = [entity["name"]]  # paragraph 0 is the title, as in KILT
    where: dict[str, int] = {}
    for attributes, sentences in _fact_paragraphs(entity):
        filler = [rng.choice(_FILLER).format(name=entity["name"]) for _ in range(rng.randint(1, 3))]
        body = filler[: len(filler) // 2] + sentences + filler[len(filler) // 2 :]
        for attribute in (attributes,) if isinstance(attributes, str) else attributes:
            where[attribute] = len(paragraphs)
        paragraphs.append(" ".join(body))
    page = {"wikipedia_id": wikipedia_id, "wikipedia_title": entity["name"], "text": paragraphs}
    return page, where


# Question templates: (relation, subject type, attribute, styles per task)
_ONE_HOP = {
    ("person", "birthplace"): {
        "nq": "where was {s} born",
        "tqa": "Which city is the birthplace of {s}?",
        "zsre": "place of birth",
        "trex": "place of birth",
        "fever": "{s} was born in {o}.",
    },
    ("person", "born"): {
        "nq": "when was {s} born",
        "tqa": "In what year was {s} born?",
        "zsre": "date of birth",
        "trex": "date of birth",
        "fever": "{s} was born in {o}.",
    },
    ("person", "employer"): {
        "nq": "who does {s} work for",
        "tqa": "Which organisation employs {s}?",
        "zsre": "employer",
        "trex": "employer",
        "fever": "{s} works for {o}.",
    },
    ("person", "occupation"): {
        "nq": "what is {s}'s occupation",
        "tqa": "What profession does {s} practise?",
        "zsre": "occupation",
        "trex": "occupation",
        "fever": "{s} is a {o}.",
    },
    ("city", "country"): {
        "nq": "what country is {s} in",
        "tqa": "In which country would you find {s}?",
        "zsre": "country",
        "trex": "country",
        "fever": "{s} is in {o}.",
    },
    ("city", "river"): {
        "nq": "what river flows through {s}",
        "tqa": "Which river runs through {s}?",
        "zsre": "located next to body of water",
        "trex": "located next to body of water",
        "fever": "The {o} flows through {s}.",
    },
    ("organization", "founder"): {
        "nq": "who founded {s}",
        "tqa": "Who was the founder of {s}?",
        "zsre": "founded by",
        "trex": "founded by",
        "fever": "{s} was founded by {o}.",
    },
    ("organization", "headquarters"): {
        "nq": "where is {s} headquartered",
        "tqa": "In which city are the headquarters of {s}?",
        "zsre": "headquarters location",
        "trex": "headquarters location",
        "fever": "{s} has its headquarters in {o}.",
    },
    ("organization", "founded"): {
        "nq": "when was {s} founded",
        "tqa": "In what year was {s} established?",
        "zsre": "inception",
        "trex": "inception",
        "fever": "{s} was founded in {o}.",
    },
    ("country", "capital"): {
        "nq": "what is the capital of {s}",
        "tqa": "Which city is the capital of {s}?",
        "zsre": "capital",
        "trex": "capital",
        "fever": "The capital of {s} is {o}.",
    },
    ("country", "currency"): {
        "nq": "what currency does {s} use",
        "tqa": "What is the currency of {s}?",
        "zsre": "currency",
        "trex": "currency",
        "fever": "{s} uses the {o}.",
    },
}
_TWO_HOP = [
    # (subject type, first attribute, second attribute, template)
    ("person", "birthplace", "country", "In which country is the city where {s} was born?"),
    ("person", "employer", "headquarters", "In which city is the organisation that employs {s} headquartered?"),
    ("person", "employer", "founder", "Who founded the organisation {s} works for?"),
    ("organization", "headquarters", "river", "Which river flows through the city where {s} has its headquarters?"),
]
# Descriptions that name an entity by its attributes instead of its name (TriviaQA-style clues):
# retrieval must match a conjunction of facts among many similar pages.
_HEADS = {
    "person": ("occupation", "the {}", "the person"),
    "organization": ("industry", "the {} organisation", "the organisation"),
    "city": (None, "", "the city"),
    "country": (None, "", "the country"),
}
_QUALIFIERS = {
    "person": {"birthplace": "born in {}", "born": "born in {}", "employer": "working for {}"},
    "organization": {"founded": "founded in {}", "headquarters": "headquartered in {}", "founder": "founded by {}"},
    "city": {"country": "in {}", "founded": "founded in {}", "river": "on the {}"},
    "country": {
        "capital": "whose capital is {}",
        "language": "whose official language is {}",
        "currency": "that uses the {}",
    },
}
_TASK_RELATIONS = {
    "nq": [key for key in _ONE_HOP],
    "tqa": [key for key in _ONE_HOP],
    "zsre": [
        key for key in _ONE_HOP if key[1] in ("birthplace", "employer", "founder", "headquarters", "capital", "river")
    ],
    "trex": [key for key in _ONE_HOP if key[1] in ("born", "occupation", "country", "founded", "currency", "employer")],
    "fever": [key for key in _ONE_HOP],
}


@dataclass
class _Generator:
    world: _World
    pages: dict[str, dict[str, Any]]
    paragraph_of: dict[str, dict[str, int]]
    subjects: dict[str, dict[str, list[dict[str, Any]]]]  # split -> type -> entities
    rng: random.Random
    id_prefix: str = ""
    counter: dict[str, int] = field(default_factory=dict)

    def provenance(self, entity: dict[str, Any], attribute: str) -> dict[str, Any]:
        wikipedia_id = self.pages[entity["name"]]["wikipedia_id"]
        paragraph = self.paragraph_of[entity["name"]][attribute]
        return {
            "wikipedia_id": wikipedia_id,
            "title": entity["name"],
            "start_paragraph_id": paragraph,
            "end_paragraph_id": paragraph,
        }

    def example(self, task: str, split: str) -> dict[str, Any]:
        rng = self.rng
        if task == "hotpotqa":
            subject_type, first, second, template = rng.choice(_TWO_HOP)
            subject = rng.choice(self.subjects[split][subject_type])
            bridge = self.world.by_name[subject[first]]
            answer = bridge[second]
            text = template.format(s=subject["name"])
            provenance = [self.provenance(subject, first), self.provenance(bridge, second)]
        else:
            subject_type, attribute = rng.choice(_TASK_RELATIONS[task])
            subject = rng.choice(self.subjects[split][subject_type])
            template = _ONE_HOP[(subject_type, attribute)][task]
            answer = subject[attribute]
            provenance = [self.provenance(subject, attribute)]
            if task in ("zsre", "trex"):
                text = f"{subject['name']} [SEP] {template}"
            elif task == "fever":
                value = answer
                if rng.random() < 0.5:
                    value = self._wrong_value(subject_type, attribute, answer)
                    answer = "REFUTES"
                else:
                    answer = "SUPPORTS"
                text = template.format(s=subject["name"], o=value)
            elif task == "tqa":
                text = template.format(s=self.describe(subject_type, subject, attribute))
            else:
                text = template.format(s=subject["name"])
        index = self.counter.get(f"{task}-{split}", 0)
        self.counter[f"{task}-{split}"] = index + 1
        return {
            "id": f"{self.id_prefix}{task}-{split}-{index}",
            "input": text,
            "output": [{"answer": answer, "provenance": provenance}],
            "meta": {"subject": subject["name"]},
        }

    def describe(self, subject_type: str, subject: dict[str, Any], asked: str) -> str:
        """The shortest attribute description (never using the asked attribute) that singles out
        `subject` among all entities of its type; the name when none does."""
        head_attribute, head_format, plain_head = _HEADS[subject_type]
        head = head_format.format(subject[head_attribute]) if head_attribute and head_attribute != asked else plain_head
        fixed = {head_attribute} if head_attribute and head_attribute != asked else set()
        candidates = [a for a in _QUALIFIERS[subject_type] if a != asked]
        self.rng.shuffle(candidates)
        population = getattr(self.world, _PLURAL[subject_type])
        for count in range(1, len(candidates) + 1):
            chosen = candidates[:count]
            keys = fixed | set(chosen)
            if sum(all(e[k] == subject[k] for k in keys) for e in population) == 1:
                qualifiers = " and ".join(_QUALIFIERS[subject_type][a].format(subject[a]) for a in chosen)
                return f"{head} {qualifiers}"
        return subject["name"]

    def _wrong_value(self, subject_type: str, attribute: str, right: str) -> str:
        """A plausible wrong value: the same attribute of another entity of the same type (a hard negative)."""
        pool = [e[attribute] for e in getattr(self.world, _PLURAL[subject_type]) if e[attribute] != right]
        return self.rng.choice(pool)


_PLURAL = {"person": "people", "city": "cities", "organization": "organizations", "country": "countries"}


def generate(
    output_dir: str | os.PathLike,
    scale: str = "quickstart",
    seed: int = 0,
    dev_fraction: float = 0.2,
    facts_seed: int | None = None,
    split_seed: int | None = None,
    id_prefix: str = "",
) -> dict[str, Any]:
    """Write the knowledge source, the train/dev sets of every task and a manifest to `output_dir`.

    Layout: `knowledge.jsonl`, `<task>-train-kilt.jsonl`, `<task>-dev-kilt.jsonl`, `manifest.json`.
    The same (scale, seed, facts_seed, VERSION) always gives byte-identical files. Returns the manifest.
    `facts_seed` re-deals the facts of seed's world (`_World.redeal_facts`): a counterfactual twin with the
    same entities, words and questions but other answers. Its pages make a pre-training corpus that teaches
    the language and the names but none of the benchmark's facts; its training files, mixed into fine-tuning
    (the train job's `data.train_dirs`), ask each question with several answers, which only reading can give.
    `split_seed` deals the subjects into train and dev with a generator of its own (default: seed's): a twin
    re-split this way asks, in train, about the benchmark's dev subjects too (with its own answers), so that no
    page is a distractor in every training example and a reranker cannot score pages by how often they were gold.
    `id_prefix` starts every page and example id, so that several worlds can share one stream, memory and index.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must lie in (0, 1), got {dev_fraction}")
    sizes = SCALES[scale]
    rng = random.Random(f"synthkilt-{VERSION}-{seed}")
    world = _World(sizes, rng)
    if facts_seed is not None:
        world.redeal_facts(random.Random(f"synthkilt-facts-{VERSION}-{facts_seed}"))

    pages, paragraph_of = {}, {}
    entities = world.countries + world.cities + world.organizations + world.people
    for number, entity in enumerate(entities):
        page, where = _render_page(entity, f"{id_prefix}{100000 + number}", rng)
        pages[entity["name"]] = page
        paragraph_of[entity["name"]] = where

    subjects: dict[str, dict[str, list]] = {"train": {}, "dev": {}}
    split_rng = rng if split_seed is None else random.Random(f"synthkilt-split-{VERSION}-{split_seed}")
    for kind in _PLURAL:
        group = list(getattr(world, _PLURAL[kind]))
        split_rng.shuffle(group)
        cut = max(1, round(len(group) * dev_fraction))
        subjects["dev"][kind], subjects["train"][kind] = group[:cut], group[cut:]
    generator = _Generator(world, pages, paragraph_of, subjects, rng, id_prefix)

    os.makedirs(output_dir, exist_ok=True)
    files = {"knowledge.jsonl": write_jsonl(os.path.join(output_dir, "knowledge.jsonl"), pages.values())}
    for task in TASKS:
        for split, count in (("train", sizes.train_per_task), ("dev", sizes.dev_per_task)):
            name = f"{task}-{split}-kilt.jsonl"
            files[name] = write_jsonl(
                os.path.join(output_dir, name), (generator.example(task, split) for _ in range(count))
            )
    manifest = {
        "name": "synthkilt",
        "version": VERSION,
        "scale": scale,
        "seed": seed,
        "facts_seed": facts_seed,
        "split_seed": split_seed,
        "id_prefix": id_prefix,
        "tasks": list(TASKS),
        "records": files,
        "sha256": {name: _sha256(os.path.join(output_dir, name)) for name in files},
    }
    with open(os.path.join(output_dir, "manifest.json"), "w") as handle:
        json.dump(manifest, handle, indent=2)
    return manifest


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
