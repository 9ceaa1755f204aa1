"""Radiology-style findings reports for the demo phantoms, and zero-shot class prompts in the same words.

``report(facts, rng, dims)`` writes a short report from the facts a phantom generator fills in
(``phantom(..., facts={})``, or ``draw_facts`` without an image; see ``pretrain.tools.demo.phantoms``).
It states only what the image shows:

- the zone where the hazy opacity predominates, the class (the key sentence, in one of several phrasings
  per class: "upper-zone predominant", "basal", "subpleural", "perihilar" on a radiograph; "upper lobe
  predominant", "ground-glass", "peribronchovascular" on CT), and that it is bilateral,
- its grade, "mild" or "moderate" (once when both lungs share it, else per side),
- the worse side where the facts name one ("more pronounced on the right"), in the radiological
  convention: the patient's right lung is on the image's left, at low indices of the image's last
  (left-right) axis,
- negations of other zones' predominance ("No basal predominance."); sometimes that the opposite zone
  is spared ("The lung bases are spared." for an upper-zone class; only the opposite zone is spared),
  and of what no phantom has (pleural effusion, pneumothorax, consolidation),
- sometimes the heart size (always normal: the phantoms' cardiothoracic ratio is 0.25 to 0.35) and the
  body habitus (from the body's half-width in the field of view).

Sentences are partly shuffled (the key sentence is not always first); a modality line, a "FINDINGS:"
heading and an "IMPRESSION:" line appear some of the time. The same facts and random stream give the
same report.

``class_prompts(dims)`` (and ``CLASS_PROMPTS_2D`` / ``CLASS_PROMPTS_3D``) are zero-shot prompt sets per
class name, built from the same phrases as the reports' key sentences.
"""
from __future__ import annotations

import numpy as np

from pretrain.tools.demo.phantoms import CLASSES_2D, CLASSES_3D, SIDES

# Per spatial dims and class: "nouns", the opacity with its zone (they take "bilateral" and a grade before them);
# "patterns", the zone's distribution (after "with"); "negations", how a report says this zone does not predominate
# (true of every other class); "spared", how it says this zone is spared (true only of the opposite class,
# ``OPPOSITE``); "impressions".
VOCABULARY: dict[int, dict[str, dict[str, list[str]]]] = {
    2: {
        "upper": {
            "nouns": ["upper-zone predominant opacities", "hazy opacification predominating in the upper zones",
                      "apical predominant hazy opacities", "opacities most marked in the upper zones"],
            "patterns": ["an upper-zone predominance", "an apical predominance", "an upper-zone distribution"],
            "negations": ["no upper-zone predominance", "no apical predominance"],
            "spared": ["the lung apices are spared", "relative sparing of the lung apices"],
            "impressions": ["upper-zone predominant hazy opacification", "apical predominant airspace opacity"],
        },
        "lower": {
            "nouns": ["basal predominant opacities", "hazy opacification predominating at the lung bases",
                      "lower-zone predominant hazy opacities", "opacities most marked in the lower zones"],
            "patterns": ["a basal predominance", "a lower-zone predominance", "a basal distribution"],
            "negations": ["no basal predominance", "no lower-zone predominance"],
            "spared": ["the lung bases are spared", "relative sparing of the lung bases"],
            "impressions": ["basal predominant hazy opacification", "lower-zone predominant airspace opacity"],
        },
        "peripheral": {
            "nouns": ["peripheral predominant opacities", "subpleural hazy opacities",
                      "hazy opacification predominating in the lung periphery", "opacities most marked subpleurally"],
            "patterns": ["a peripheral predominance", "a subpleural distribution", "a peripheral distribution"],
            "negations": ["no peripheral predominance", "no subpleural predominance"],
            "spared": ["the lung periphery is spared", "relative sparing of the lung periphery"],
            "impressions": ["peripheral predominant hazy opacification", "subpleural airspace opacity"],
        },
        "central": {
            "nouns": ["perihilar predominant opacities", "bat-wing perihilar opacities",
                      "hazy opacification predominating in the perihilar regions", "opacities most marked centrally"],
            "patterns": ["a perihilar predominance", "a bat-wing distribution", "a central perihilar distribution"],
            "negations": ["no perihilar predominance", "no central predominance"],
            "spared": ["the perihilar regions are spared", "relative sparing of the perihilar regions"],
            "impressions": ["perihilar predominant hazy opacification", "bat-wing airspace opacity"],
        },
    },
    3: {
        "upper": {
            "nouns": ["upper lobe predominant ground-glass opacities", "ground-glass opacity predominating in the upper lobes",
                      "apical predominant ground-glass opacities", "ground-glass opacities most marked in the upper lobes"],
            "patterns": ["an upper lobe predominance", "an apical predominance", "an upper lobe distribution"],
            "negations": ["no upper lobe predominance", "no apical predominance"],
            "spared": ["the lung apices are spared", "relative sparing of the lung apices"],
            "impressions": ["upper lobe predominant ground-glass opacity", "apical predominant ground-glass attenuation"],
        },
        "lower": {
            "nouns": ["lower lobe predominant ground-glass opacities", "basal predominant ground-glass opacities",
                      "ground-glass opacity predominating at the lung bases",
                      "ground-glass opacities most marked in the lower lobes"],
            "patterns": ["a lower lobe predominance", "a basal predominance", "a basal distribution"],
            "negations": ["no lower lobe predominance", "no basal predominance"],
            "spared": ["the lung bases are spared", "relative sparing of the lung bases"],
            "impressions": ["lower lobe predominant ground-glass opacity", "basal predominant ground-glass attenuation"],
        },
        "peripheral": {
            "nouns": ["subpleural ground-glass opacities", "peripheral predominant ground-glass opacities",
                      "ground-glass opacity predominating in the lung periphery",
                      "ground-glass opacities most marked subpleurally"],
            "patterns": ["a subpleural predominance", "a peripheral distribution", "a subpleural distribution"],
            "negations": ["no subpleural predominance", "no peripheral predominance"],
            "spared": ["the subpleural lung is spared", "relative sparing of the subpleural lung"],
            "impressions": ["subpleural ground-glass opacity", "peripheral predominant ground-glass attenuation"],
        },
        "central": {
            "nouns": ["peribronchovascular ground-glass opacities", "central predominant ground-glass opacities",
                      "ground-glass opacity predominating in the perihilar regions",
                      "perihilar ground-glass opacities"],
            "patterns": ["a central predominance", "a peribronchovascular distribution", "a perihilar distribution"],
            "negations": ["no central predominance", "no peribronchovascular predominance"],
            "spared": ["the central lung is spared", "relative sparing of the perihilar regions"],
            "impressions": ["central peribronchovascular ground-glass opacity", "perihilar ground-glass attenuation"],
        },
    },
}
OPPOSITE = {"upper": "lower", "lower": "upper", "peripheral": "central", "central": "peripheral"}
# The opacity without its zone (mass nouns: "There is {generic} ...").
GENERIC = {2: ["hazy opacification", "hazy airspace opacity", "diffuse hazy opacity"],
           3: ["ground-glass opacity", "ground-glass attenuation", "hazy ground-glass opacity"]}
# How a report names the worse side ({side}: "right" or "left"); no other phrase says a side is worse.
WORSE = ["more pronounced on the {side}", "more marked in the {side} lung", "worse on the {side}"]
# What no phantom has: negated in every report now and then.
ABSENT = ["no pleural effusion", "no pneumothorax", "no consolidation"]
MODALITY = {2: ["Frontal chest radiograph.", "PA chest radiograph.", "Chest X-ray, PA view."],
            3: ["CT of the chest.", "Axial chest CT.", "Non-contrast CT of the chest."]}
# Zero-shot prompt templates; {noun} and {pattern} take a class's phrases.
PROMPT_TEMPLATES = {
    2: ["chest radiograph with bilateral {noun}", "a chest x-ray showing {noun}", "bilateral {noun}",
        "hazy opacification in both lungs with {pattern}", "frontal chest radiograph: bilateral opacities with {pattern}"],
    3: ["chest CT with bilateral {noun}", "a CT of the chest showing {noun}", "bilateral {noun}",
        "ground-glass opacity in both lungs with {pattern}", "chest CT: bilateral ground-glass opacities with {pattern}"],
}


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _grades(grade: dict[str, str], rng: np.random.Generator) -> str:
    """Different grades per side: "mild on the right and moderate on the left" (either side first)."""
    a, b = SIDES if rng.random() < 0.5 else SIDES[::-1]
    if rng.random() < 0.5:
        return f"{grade[a]} on the {a} and {grade[b]} on the {b}"
    return f"{grade[a]} in the {a} lung and {grade[b]} in the {b} lung"


def _finding(vocab: dict[str, list[str]], grade: dict[str, str], dims: int, rng: np.random.Generator) -> str:
    """The key sentence, without its period: the zone, bilateral, and the grade (once, or per side)."""
    noun, pattern, generic = _pick(rng, vocab["nouns"]), _pick(rng, vocab["patterns"]), _pick(rng, GENERIC[dims])
    form = int(rng.integers(3))
    if grade["right"] == grade["left"]:
        g = grade["right"]
        if form == 0:
            return f"{_cap(g)} bilateral {noun}"
        if form == 1:
            return f"{_cap(g)} {generic} in both lungs with {pattern}"
        return f"Bilateral {noun}, {g} in degree"
    per_side = _grades(grade, rng)
    if form == 0:
        return f"Bilateral {noun}, {per_side}"
    if form == 1:
        return f"There is {generic} in both lungs with {pattern}, {per_side}"
    return f"{_cap(noun)} in both lungs, {per_side}"


def _lead(facts: dict, name: str, dims: int, rng: np.random.Generator) -> list[str]:
    """The key sentence and its follow-ups (the opposite zone spared, the worse side), clauses or sentences."""
    key, after = _finding(VOCABULARY[dims][name], facts["grade"], dims, rng), []
    if rng.random() < 0.4:
        spared = _pick(rng, VOCABULARY[dims][OPPOSITE[name]]["spared"])
        if spared.startswith("relative") and rng.random() < 0.5:
            key += f", with {spared}"
        else:
            after.append(_cap(spared) + ".")
    side = facts.get("worse_side")
    if side:
        worse = _pick(rng, WORSE).format(side=side)
        if rng.random() < 0.5:
            key += f", {worse}"
        else:
            after.append(f"{_pick(rng, ['The opacities are', 'The changes are', 'Asymmetric,'])} {worse}.")
    return [key + "."] + after


def _negations(items: list[str], rng: np.random.Generator, lists: bool = True) -> list[str]:
    """Sentences from "no ..." phrases: one each (style 0), or joined: "No a, b or c." (style 1, only when ``lists``)
    or "No a and no b." (style 2)."""
    styles = (0, 1, 2) if lists else (0, 2)
    style = styles[int(rng.integers(len(styles)))]
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
    kind = "slender" if width < 0.55 else "broad" if width > 0.72 else "average"
    return _pick(rng, [f"{_cap(kind)} body habitus.", f"Body habitus is {kind}."])


def _impression(facts: dict, vocab: dict[str, list[str]], rng: np.random.Generator) -> str:
    grade, side = facts["grade"], facts.get("worse_side")
    head = f"{_cap(grade['right'])} bilateral" if grade["right"] == grade["left"] else "Bilateral"
    tail = f", {_pick(rng, WORSE).format(side=side)}" if side else ""
    return f"IMPRESSION: {head} {_pick(rng, vocab['impressions'])}{tail}."


def report(facts: dict, rng: np.random.Generator, dims: int) -> str:
    """A findings report for one phantom from its ``facts`` (``phantom(..., facts=...)`` or ``draw_facts``)."""
    if dims not in VOCABULARY:
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    if facts.get("dims", dims) != dims:
        raise ValueError(f"facts are of a {facts['dims']}D phantom, asked for a {dims}D report")
    classes = CLASSES_2D if dims == 2 else CLASSES_3D
    name = facts.get("class", classes[facts["label"]])
    lead = _lead(facts, name, dims, rng)  # the key sentence and its follow-ups stay together
    others = [c for c in classes if c != name]
    chosen = rng.permutation(len(others))[: int(rng.integers(1, len(others) + 1))]
    rest = _negations([_pick(rng, VOCABULARY[dims][others[i]]["negations"]) for i in chosen], rng, lists=False)
    absent = [a for a in ABSENT if rng.random() < 0.6]
    if absent:
        rest += _negations(absent, rng)
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
    if rng.random() < 0.4:
        lines.append(_impression(facts, VOCABULARY[dims][name], rng))
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
