"""BIO sentences and QA questions, rendered with the character spans of every attribute value and of the subject.

The subject span (the first mention of the full name) lets analyses find the same entity in both formats: the
representation and gradient analyses compare a fact's BIO and QA examples at the subject and at the answer.
Every BIO template starts with its subject, `{name}`, so a pronoun (He/She) or the full name fits at the sentence start;
`{value}` appears once. The first template of each attribute is the default (`bio_templates=1`): with it a biography
is 35 word tokens, 37 with BOS and EOS (../shared/notes/tiny-recall.md).
"""
from factrecall_jax.data.population import ATTRIBUTES, Person

BIO_TEMPLATES = {
    "birth_date": (
        "{name} was born on {value}.",
        "{name} came into this world on {value}.",
        "{name} has a birth date of {value}.",
        "{name} was welcomed into the world on {value}.",
        "{name} entered the world on {value}.",
    ),
    "birth_city": (
        "{name} was born in {value}.",
        "{name} spent early years in {value}.",
        "{name} comes from {value}.",
        "{name} hails from {value}.",
        "{name} grew up in {value}.",
    ),
    "university": (
        "{name} attended {value}.",
        "{name} studied at {value}.",
        "{name} graduated from {value}.",
        "{name} received an education at {value}.",
        "{name} completed a degree at {value}.",
    ),
    "major": (
        "{name} majored in {value}.",
        "{name} specialized in {value}.",
        "{name} focused on {value}.",
        "{name} pursued a major in {value}.",
        "{name} earned a degree in {value}.",
    ),
    "employer": (
        "{name} works at {value}.",
        "{name} is employed by {value}.",
        "{name} has a job at {value}.",
        "{name} works for {value}.",
        "{name} is on the staff of {value}.",
    ),
    "employer_city": (
        "{name} works in {value}.",
        "{name} is based in {value}.",
        "{name} has an office in {value}.",
        "{name} commutes to {value}.",
        "{name} works out of {value}.",
    ),
}

# The one question per attribute that training and the in-distribution / held-out QA splits use.
QUESTIONS = {
    "birth_date": "When was {name} born?",
    "birth_city": "What is the birth city of {name}?",
    "university": "Which university did {name} study at?",
    "major": "What major did {name} study?",
    "employer": "Which company does {name} work for?",
    "employer_city": "Which city does {name} work in?",
}

# Other wordings of the same questions, never used in training, to test whether QA skill transfers across formats.
PARAPHRASES = {
    "birth_date": (
        "What is the birth date of {name}?",
        "On what date was {name} born?",
        "What is the date of birth of {name}?",
        "When did {name} come into the world?",
    ),
    "birth_city": (
        "Where was {name} born?",
        "In which city was {name} born?",
        "What city is {name} from?",
        "What is the birthplace of {name}?",
    ),
    "university": (
        "Which university did {name} attend?",
        "Where did {name} go to college?",
        "From which university did {name} graduate?",
        "What school did {name} attend?",
    ),
    "major": (
        "What did {name} major in?",
        "What was the field of study of {name}?",
        "What subject did {name} specialize in?",
        "What did {name} study in college?",
    ),
    "employer": (
        "Who employs {name}?",
        "Which company employs {name}?",
        "What company does {name} work at?",
        "Who is the employer of {name}?",
    ),
    "employer_city": (
        "In which city does {name} work?",
        "What city does {name} work in?",
        "Where is the employer of {name} located?",
        "In what city is the office of {name}?",
    ),
}


def render_bio(person: Person, template_ids, order, fullname=False):
    """One biography: sentence j states attribute ATTRIBUTES[order[j]] with template template_ids[order[j]].

    The first sentence names the person in full, later ones use the pronoun unless `fullname`.
    Returns the text, the value spans, `(attribute, start, end)` in text order, and the subject span `(start, end)`:
    the full name in the first sentence.
    """
    sentences, spans, offset = [], [], 0
    for j, a in enumerate(order):
        attribute = ATTRIBUTES[a]
        before, after = BIO_TEMPLATES[attribute][template_ids[a]].split("{value}")
        before = before.format(name=person.name if j == 0 or fullname else person.pronoun)
        value = getattr(person, attribute)
        start = offset + len(before)
        spans.append((attribute, start, start + len(value)))
        sentences.append(before + value + after)
        offset += len(sentences[-1]) + 1  # the space joining sentences
    name_start = BIO_TEMPLATES[ATTRIBUTES[order[0]]][template_ids[order[0]]].index("{name}")  # in the first sentence
    return " ".join(sentences), spans, (name_start, name_start + len(person.name))


def render_qa(person: Person, attribute, question):
    """A QA pair, `question + " " + answer`; returns the prompt (the question), the text, the answer span and the
    subject span (the name in the question)."""
    prompt = question.format(name=person.name)
    answer = getattr(person, attribute)
    name_start = question.index("{name}")
    return (prompt, f"{prompt} {answer}", (len(prompt) + 1, len(prompt) + 1 + len(answer)),
            (name_start, name_start + len(person.name)))
