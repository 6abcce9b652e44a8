"""Every model beside the trivial answer: the mean frame, one state, the constant prediction.

A study always has a best trial, but the best of ten AEs may draw the arena and no mouse, and
the best of ten ARHMMs may segment nothing a single AR model does not explain. Each family
declares how its runs' metrics compare with its trivial answer (``Family.trivial``); the study
summary, the parent run's description, ``bnet best`` and the report say the figure for the
best model, and warn in plain words when it does not beat that answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

MIN_VAR_EXPLAINED = 0.1
"""An AE below this held-out frame variance explained draws little more than the mean frame:
the mirror-mouse demo's 20-epoch champion explained 0.029 with the paws missing, the open-field
one 0.0 with no mouse (the mean frame itself scores 0, a perfect model 1)."""


SMALL_ANIMAL_SHARE = 0.02
"""Below this share of a held-out frame's pixels off the mean frame, the animal is a few pixels
of the frame (the open-field mouse seen whole: 0.8%; centred windows 14-22%): an AE may beat
the mean frame there and still hold little of the animal's posture."""


@dataclass(frozen=True)
class TrivialComparison:
    """How one run compares with its family's trivial answer.

    Attributes:
        figure: the comparison in words, e.g. "explains 62% of the held-out frame variance".
        beats: whether the run beats the trivial answer (by the family's margin).
        advice: what to try when it does not.
        caveat: a warning that holds even where the run beats the trivial answer.
    """

    figure: str
    beats: bool
    advice: str = ""
    caveat: str = ""

    @property
    def warns(self) -> bool:
        return not self.beats or bool(self.caveat)

    def sentence(self, subject: str) -> str:
        """``subject`` + the figure; for a run that does not beat the trivial answer a plain
        warning with the advice, for one with a caveat a warning with the caveat."""
        said = f"{subject} {self.figure}"
        if not self.beats:
            return f"warning: {said}: {self.advice}"
        return f"warning: {said}, but {self.caveat}" if self.caveat else said


CENTRE = ("centre the frames on it (`bnet data build --track-animal --window PX`, or `--centre-on KEYPOINT` "
          "with a pose file)")


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def against_mean_frame(metrics: Mapping[str, float]) -> TrivialComparison | None:
    """An AE run against the training split's mean frame (``val_var_explained``)."""
    explained = metrics.get("val_var_explained")
    if explained is None:
        return None  # runs logged before the metric existed
    parts = [f"{_percent(metrics[key])} on the {pixels} pixels" for key, pixels in
             (("val_moving_var_explained", "moving"), ("val_masked_var_explained", "masked (the animal's)"))
             if key in metrics]
    figure = (f"explains {_percent(explained)} of the held-out frame variance"
              + (f" ({', '.join(parts)})" if parts else "") + " beyond the training mean frame")
    changed = metrics.get("val_changed_pixel_share")
    on_animal = metrics.get("val_masked_var_explained")
    caveat = ""
    if changed is not None and changed < SMALL_ANIMAL_SHARE:
        caveat = (f"the frames differ from the mean frame in {_percent(changed)} of their pixels: the animal is a "
                  f"few pixels of the frame and the latents can hold little of its posture; {CENTRE}")
    elif on_animal is not None and on_animal < MIN_VAR_EXPLAINED:
        caveat = (f"on the animal's (masked) pixels it explains {_percent(on_animal)}: the figure is carried by "
                  f"what moves around the animal, and the latents hold little of its posture; weigh the loss on "
                  f"the animal (use_output_mask: true) and look at plots/reconstructions.png")
    verdict = ("it reconstructs the frames worse than the mean frame does" if explained < 0 else
               "it reconstructs little more than the mean frame (the background, not the animal)")
    return TrivialComparison(figure, explained >= MIN_VAR_EXPLAINED, (
        f"{verdict}. A freely moving animal is a few pixels of a downsampled whole frame: {CENTRE}; on "
        "head-fixed video train longer (`max_n_epochs`) or at a higher learning rate"), caveat)


def against_one_state(metrics: Mapping[str, float]) -> TrivialComparison | None:
    """An ARHMM run against one state with the same lags and noise (a single AR model)."""
    gain = metrics.get("val_ll_gain_per_step")
    if gain is None:
        return None
    states = metrics.get("n_states_used")
    figure = (f"gains {gain:.4g} nats of held-out log-likelihood per step and dimension over one state with "
              f"the same lags" + (f" ({int(states)} states used)" if states is not None else ""))
    return TrivialComparison(figure, gain > 0, (
        "its states explain nothing a single autoregressive model does not: try fewer states or sticky "
        "transitions, more EM iterations, or latents that carry the behaviour (check the AE's variance explained)"))


def against_constant(metrics: Mapping[str, float]) -> TrivialComparison | None:
    """A decoder run against the constant prediction: R² 0 for continuous targets, the
    training frequencies (states) or mean rates (spike counts) for log-likelihoods."""
    advice = ("the neural activity predicts this target no better than a constant here: check the target and "
              "the neurons (a region that does not encode it), or allow more lags and regularisation")
    if "val_ll_constant" in metrics and "val_ll" in metrics:
        gain = metrics["val_ll"] - metrics["val_ll_constant"]
        what = "training state frequencies" if "val_accuracy" in metrics else "constant mean rates"
        figure = (f"has held-out log-likelihood {metrics['val_ll']:.4g} per frame, {gain:+.4g} over the {what} "
                  f"({metrics['val_ll_constant']:.4g})")
        if "val_accuracy" in metrics and "val_accuracy_constant" in metrics:
            figure += f"; accuracy {metrics['val_accuracy']:.3f} vs {metrics['val_accuracy_constant']:.3f}"
        return TrivialComparison(figure, gain > 0, advice)
    if "val_r2" in metrics:
        r2 = metrics["val_r2"]
        return TrivialComparison(f"predicts held-out frames with R² {r2:.3f} (a constant scores 0)", r2 > 0, advice)
    return None
