"""Radiology-style findings reports for the demo phantoms, and zero-shot class prompts in the same words.

``report(facts, rng, dims)`` writes a short report from the facts a phantom generator fills in
(``phantom(..., facts={})``, or ``draw_facts`` without an image; see ``pretrain.tools.demo.phantoms``).
It states only what the image shows:

- the lesion kind, the class (the key sentence, in one of several phrasings per class),
- how many lesions there are (the exact count in words, or "a few" / "several" / "numerous"),
- where they lie: the right lung only, the left lung only, or both lungs (sometimes with the count per
  side), in the radiological convention: the patient's right lung is on the image's left, at low
  indices of the image's last (left-right) axis,
- negations of other lesion kinds ("No cystic change.") and of what no phantom has (pleural effusion,
  pneumothorax, consolidation),
- sometimes the heart size (always normal: the phantoms' cardiothoracic ratio is 0.25 to 0.35) and the
  body habitus (from the body's width in the field of view).

Sentences are partly shuffled (the key sentence is not always first); a modality line, a "FINDINGS:"
heading and an "IMPRESSION:" line appear some of the time. The same facts and random stream give the
same report.

``class_prompts(dims)`` (and ``CLASS_PROMPTS_2D`` / ``CLASS_PROMPTS_3D``) are zero-shot prompt sets per
class name, built from the same phrases as the reports' key sentences.
"""
from __future__ import annotations

import numpy as np

from pretrain.tools.demo.phantoms import CLASSES_2D, CLASSES_3D, SIDES

NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]

# Per spatial dims and class: "nouns", plural phrases for the lesions (they take a count or "multiple");
# "patterns", singular phrases for the whole picture; "negations", how a report says this kind is absent; "impressions".
VOCABULARY: dict[int, dict[str, dict[str, list[str]]]] = {
    2: {
        "nodular": {
            "nouns": ["solid nodules", "round nodular opacities", "well-defined solid nodules", "rounded nodular densities",
                      "small solid pulmonary nodules"],
            "patterns": ["a nodular pattern", "a multinodular pattern", "nodular opacification"],
            "negations": ["no pulmonary nodules", "no nodular opacities", "no discrete nodules"],
            "impressions": ["multiple pulmonary nodules", "nodular pattern"],
        },
        "cystic": {
            "nouns": ["thin-walled cysts", "ring-shaped lucencies with thin walls", "air-filled cysts with thin walls",
                      "round cystic lucencies", "thin-walled ring shadows"],
            "patterns": ["a cystic pattern", "cystic change", "a thin-walled cystic pattern"],
            "negations": ["no cystic change", "no cysts", "no ring-shaped lucencies"],
            "impressions": ["cystic lung disease", "multiple thin-walled cysts"],
        },
        "linear": {
            "nouns": ["linear opacities", "short linear bands", "straight band-like opacities", "short line shadows",
                      "linear strands"],
            "patterns": ["a linear pattern", "linear banding", "linear band-like opacification"],
            "negations": ["no linear opacities", "no linear bands", "no band-like opacities"],
            "impressions": ["linear opacities", "linear band pattern"],
        },
        "reticular": {
            "nouns": ["cross-shaped reticular opacities", "foci of crossing interstitial lines", "small reticular crosses",
                      "intersecting line opacities"],
            "patterns": ["a reticular pattern", "crossing interstitial lines", "reticular interstitial change",
                         "a fine reticular network"],
            "negations": ["no reticular pattern", "no interstitial reticulation", "no crossing interstitial lines"],
            "impressions": ["reticular interstitial pattern", "reticular pattern"],
        },
    },
    3: {
        "nodular": {
            "nouns": ["solid nodules", "spherical nodular opacities", "round solid nodules", "well-circumscribed spherical nodules"],
            "patterns": ["a nodular pattern", "a multinodular pattern", "nodular opacification"],
            "negations": ["no pulmonary nodules", "no spherical nodules", "no nodular opacities"],
            "impressions": ["multiple pulmonary nodules", "nodular pattern"],
        },
        "vessel": {
            "nouns": ["tubular structures running cranio-caudally", "cranio-caudal tubular opacities",
                      "vessel-like tubes along the body axis", "tubular densities oriented through-plane"],
            "patterns": ["a cranio-caudal tubular pattern", "a through-plane tubular pattern", "a vessel-like tubular pattern"],
            "negations": ["no cranio-caudal tubular structures", "no through-plane tubular opacities",
                          "no vessel-like tubes along the body axis"],
            "impressions": ["cranio-caudal tubular opacities", "vessel-like tubular pattern"],
        },
        "linear": {
            "nouns": ["tubular opacities lying in the axial plane", "in-plane linear opacities",
                      "short linear bands within the axial plane", "axial linear densities"],
            "patterns": ["an in-plane linear pattern", "an axial linear pattern", "in-plane linear banding"],
            "negations": ["no in-plane linear opacities", "no linear bands in the axial plane", "no axial linear densities"],
            "impressions": ["axial linear opacities", "in-plane linear pattern"],
        },
        "plate": {
            "nouns": ["plate-like flat opacities in the axial plane", "flat disc-shaped opacities parallel to the axial plane",
                      "thin plate-like densities", "axial plate-like opacities"],
            "patterns": ["a plate-like pattern", "flat plate-like opacification", "an axial plate-like pattern"],
            "negations": ["no plate-like opacities", "no flat disc-shaped opacities", "no axial plate-like densities"],
            "impressions": ["axial plate-like opacities", "plate-like pattern"],
        },
    },
}
# What no phantom has: negated in every report now and then.
ABSENT = ["no pleural effusion", "no pneumothorax", "no consolidation"]
MODALITY = {2: ["Frontal chest radiograph.", "PA chest radiograph.", "Chest X-ray, PA view."],
            3: ["CT of the chest.", "Axial chest CT.", "Non-contrast CT of the chest."]}
# Zero-shot prompt templates; {noun} and {pattern} take a class's phrases.
PROMPT_TEMPLATES = {
    2: ["chest radiograph with multiple {noun}", "a chest x-ray showing {noun}", "scattered {noun} in the lungs",
        "{pattern} in the lungs", "frontal chest radiograph: {pattern}"],
    3: ["chest CT with multiple {noun}", "a CT of the chest showing {noun}", "scattered {noun} in the lungs",
        "{pattern} in the lungs", "chest CT: {pattern}"],
}


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _number(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def _bucket(n: int) -> str:
    return "a few" if n <= 5 else "several" if n <= 9 else "numerous"


def _where(laterality: str, dims: int, rng: np.random.Generator) -> str:
    if laterality == "both":
        return _pick(rng, ["in both lungs", "bilaterally", "throughout both lungs"] + ["in both lung fields"] * (dims == 2))
    other = SIDES[1 - SIDES.index(laterality)]
    return _pick(rng, [f"in the {laterality} lung only", f"confined to the {laterality} lung",
                       f"in the {laterality} lung, sparing the {other}"])


def _finding(vocab: dict[str, list[str]], count: int, laterality: str, dims: int, rng: np.random.Generator) -> str:
    """The key sentence: the lesion kind, how many, and where."""
    noun, where = _pick(rng, vocab["nouns"]), _where(laterality, dims, rng)
    style = rng.random()
    if style < 0.45:
        counted, total = _number(count), ""
    elif style < 0.8:
        counted, total = _bucket(count), ""
    else:  # count left vague in the phrase, given after it
        counted, total = _pick(rng, ["multiple", "scattered"]), f", {_number(count)} in total"
    form = int(rng.integers(4))
    if form == 0:
        return f"{_cap(counted)} {noun} are seen {where}{total}."
    if form == 1:
        return f"There are {counted} {noun} {where}{total}."
    if form == 2:
        return f"{_cap(_pick(rng, vocab['patterns']))} {where}, with {counted} {noun}{total}."
    return f"{_cap(counted)} {noun} {where}{total}."


def _per_lung(facts: dict, rng: np.random.Generator) -> str | None:
    """A follow-up sentence: the count per side (bilateral) or the clear lung (one-sided); sometimes none."""
    per, lat = facts["per_lung"], facts["laterality"]
    if rng.random() < 0.5:
        return None
    if lat == "both":
        right, left = _number(per["right"]), _number(per["left"])
        return _pick(rng, [f"{_cap(right)} in the right lung and {left} in the left.",
                           f"Right lung: {right}; left lung: {left}.",
                           f"{_cap(left)} lie in the left lung, {right} in the right."])
    other = SIDES[1 - SIDES.index(lat)]
    return _pick(rng, [f"The {other} lung is clear.", f"No lesions in the {other} lung."])


def _negations(items: list[str], rng: np.random.Generator) -> list[str]:
    """Sentences from "no ..." phrases: one each, or joined ("No a, b or c." / "No a and no b.")."""
    style = int(rng.integers(3))
    if style == 0 or len(items) == 1:
        return [_cap(i) + "." for i in items]
    if style == 1:
        rest = [i[3:] for i in items[1:]]
        tail = rest[-1] if len(rest) == 1 else ", ".join(rest[:-1]) + " or " + rest[-1]
        return [f"{_cap(items[0])}{',' if len(rest) > 1 else ' or'} {tail}."]
    return [_cap(", ".join(items[:-1]) + " and " + items[-1]) + "."]


def _heart(facts: dict, dims: int, rng: np.random.Generator) -> str:
    options = ["Heart size is normal.", "The heart is not enlarged.", "Normal heart size."]
    if dims == 2:
        options += ["The cardiac silhouette is normal in size.",
                    f"Normal heart size, cardiothoracic ratio {facts['heart_ratio']:.2f}."]
    return _pick(rng, options)


def _habitus(facts: dict, rng: np.random.Generator) -> str:
    width = facts["body_width"]
    kind = "slender" if width < 0.72 else "broad" if width > 0.82 else "average"
    return _pick(rng, [f"{_cap(kind)} body habitus.", f"Body habitus is {kind}."])


def _impression(vocab: dict[str, list[str]], laterality: str, rng: np.random.Generator) -> str:
    side = {"both": ["bilateral", "both lungs"], "right": ["right lung", "right-sided"],
            "left": ["left lung", "left-sided"]}[laterality]
    return f"IMPRESSION: {_cap(_pick(rng, vocab['impressions']))}, {_pick(rng, side)}."


def report(facts: dict, rng: np.random.Generator, dims: int) -> str:
    """A findings report for one phantom from its ``facts`` (``phantom(..., facts=...)`` or ``draw_facts``)."""
    if dims not in VOCABULARY:
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    if facts.get("dims", dims) != dims:
        raise ValueError(f"facts are of a {facts['dims']}D phantom, asked for a {dims}D report")
    classes = CLASSES_2D if dims == 2 else CLASSES_3D
    name = facts.get("class", classes[facts["label"]])
    vocab = VOCABULARY[dims][name]
    count, lat = int(facts["count"]), facts["laterality"]
    lead = []  # the key sentence and its follow-up stay together
    if count > 0:
        lead.append(_finding(vocab, count, lat, dims, rng))
        follow = _per_lung(facts, rng)
        if follow:
            lead.append(follow)
    else:
        lead.append(_pick(rng, ["No focal lung lesions.", "The lungs are clear."]))
    others = [c for c in classes if c != name]
    chosen = rng.permutation(len(others))[: int(rng.integers(1, len(others) + 1))]
    kinds = [_pick(rng, VOCABULARY[dims][others[i]]["negations"]) for i in chosen]
    absent = [a for a in ABSENT if rng.random() < 0.6]
    if absent and rng.random() < 0.5:  # one negation sentence for all
        rest = _negations(kinds + absent, rng)
    else:
        rest = _negations(kinds, rng) + (_negations(absent, rng) if absent else [])
    if rng.random() < 0.5:
        rest.append(_heart(facts, dims, rng))
    if rng.random() < 0.3:
        rest.append(_habitus(facts, rng))
    rest = [rest[i] for i in rng.permutation(len(rest))]
    at = 0 if rng.random() < 0.6 else int(rng.integers(len(rest) + 1))
    body = rest[:at] + lead + rest[at:]
    lines = []
    if rng.random() < 0.4:
        lines.append(_pick(rng, MODALITY[dims]))
    lines.append(("FINDINGS: " if rng.random() < 0.5 else "") + " ".join(body))
    if count > 0 and rng.random() < 0.4:
        lines.append(_impression(vocab, lat, rng))
    return "\n".join(lines)


def class_prompts(dims: int) -> dict[str, list[str]]:
    """Zero-shot prompts per class name (in class order), in the words of the reports' key sentences."""
    if dims not in VOCABULARY:
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    out = {}
    for name in (CLASSES_2D if dims == 2 else CLASSES_3D):
        vocab, prompts = VOCABULARY[dims][name], []
        for template in PROMPT_TEMPLATES[dims]:
            for phrase in vocab["nouns"][:3] if "{noun}" in template else vocab["patterns"]:
                text = template.format(noun=phrase, pattern=phrase)
                if text not in prompts:
                    prompts.append(text)
        out[name] = prompts
    return out


CLASS_PROMPTS_2D = class_prompts(2)
CLASS_PROMPTS_3D = class_prompts(3)
