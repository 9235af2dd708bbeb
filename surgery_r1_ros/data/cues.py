"""What each instrument looks like and which visible cue shows each state.

The synthetic renderer draws these cues and the chain-of-thought writer describes them, so the
reasoning a model learns always names something that is really in the picture. For real EndoVis
data the same wording describes what the labelled state typically looks like.
"""

from __future__ import annotations

# Which states each instrument can be in (as in EndoVis-18: a stapler staples, scissors cut, ...).
INSTRUMENT_STATES: dict[str, tuple[str, ...]] = {
    "bipolar_forceps": ("Idle", "Grasping", "Retraction", "Tissue_Manipulation", "Cauterization", "Tool_Manipulation"),
    "prograsp_forceps": ("Idle", "Grasping", "Retraction", "Tissue_Manipulation", "Tool_Manipulation"),
    "large_needle_driver": ("Idle", "Suturing", "Looping", "Grasping", "Tool_Manipulation"),
    "monopolar_curved_scissors": ("Idle", "Cutting", "Cauterization", "Tissue_Manipulation"),
    "ultrasound_probe": ("Idle", "Ultrasound_Sensing", "Retraction"),
    "suction": ("Idle", "Suction", "Retraction"),
    "clip_applier": ("Idle", "Clipping"),
    "stapler": ("Idle", "Staple"),
}

# How each instrument is told apart (the renderer's design and the reasoning's wording).
INSTRUMENT_LOOKS: dict[str, tuple[str, ...]] = {
    "bipolar_forceps": ("a dark shaft with two slim, rounded jaws", "slender paired jaws on a dark shaft"),
    "prograsp_forceps": ("a dark shaft with broad fenestrated jaws", "wide jaws with a window in each blade"),
    "large_needle_driver": ("a dark shaft with short, heavy jaws", "stubby, thick jaws on a dark shaft"),
    "monopolar_curved_scissors": ("a dark shaft with curved blades", "two curved blades at the tip"),
    "ultrasound_probe": ("a white cylindrical probe with a flat face", "a pale, thick probe with a flat head"),
    "suction": ("a thin metallic tube with an open tip", "a plain steel cannula"),
    "clip_applier": ("a dark shaft with long, narrow jaws", "narrow elongated jaws"),
    "stapler": ("a thick shaft with a long, broad cartridge jaw", "a bulky two-part stapling jaw"),
}

STATE_CUES: dict[str, tuple[str, ...]] = {
    "Idle": ("its jaws are closed and it rests away from the tissue", "it is not touching anything"),
    "Grasping": ("its jaws are closed on a fold of tissue", "it holds tissue pinched between its jaws"),
    "Retraction": ("it lifts a flap of tissue aside", "the tissue beside it is pulled back and stretched"),
    "Tissue_Manipulation": (
        "its tip presses into the tissue and dents it",
        "the tissue is pushed and deformed at its tip",
    ),
    "Tool_Manipulation": ("its jaws hold a small metal object", "it is handling an object, not tissue"),
    "Cutting": ("its blades are open over a fresh cut line", "a cut line opens in the tissue between its blades"),
    "Cauterization": ("smoke rises from a charred spot at its tip", "a burn mark and a plume of smoke sit at its tip"),
    "Suction": ("fluid is drawn into its open tip", "a pool of blood shrinks around its tip"),
    "Looping": ("a thread loop is wound around its jaws", "suture thread forms a loop around its tip"),
    "Suturing": ("it holds a curved needle with thread", "a curved needle trailing thread sits in its jaws"),
    "Clipping": ("a metal clip sits in its jaws over a vessel", "a small metal clip is being closed on a vessel"),
    "Staple": ("a row of staples lines the tissue at its jaws", "fresh staple marks run along the tissue it clamps"),
    "Ultrasound_Sensing": ("its flat face lies on the tissue", "its head is pressed flat against the tissue surface"),
}

ORGAN_CUES: dict[str, tuple[str, ...]] = {
    "kidney": ("the smooth, dark red surface of the kidney", "a dark red, bean-shaped organ"),
}
