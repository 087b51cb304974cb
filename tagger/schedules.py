"""Training schedules: which optimizer and learning rate each epoch uses (no TensorFlow here).

    constant        --optimizer at --lr (and --momentum) for every epoch (the study's runs)
    won2020         Won et al. 2020 (minzwon/sota-music-tagging-models, training/solver.py): --optimizer
                    at --lr (their preset: Adam, 1e-4) for 80 epochs, then SGD with Nesterov momentum
                    0.9 at 1e-3 for 20 epochs, 1e-4 for 20 and 1e-5 up to the last (200); at each
                    switch the weights of the best epoch so far by validation loss are reloaded. The
                    reference's counter never resets, so the switches fall on these fixed epochs.
    won2020:A,B,C   the same with the switches after epochs A, B and C (a shorter run of the recipe)

A run is a list of phases; tagger.train runs each as one `model.fit` over its epochs, and a resumed run
starts in the phase of its next epoch, so a schedule needs no state beyond the epoch and the best
epoch's weights, which the checkpoint keeps.
"""
from dataclasses import dataclass

NAMES = ("constant", "won2020")
WON2020_SWITCHES = (80, 100, 120)
WON2020_SGD = (1e-3, 1e-4, 1e-5)
# Won et al.'s training preset: what a family trained with their recipe takes on MagnaTagATune.
WON2020_PRESET = dict(optimizer="adam", lr=1e-4, momentum=0.0, batch_size=16, epochs=200, schedule="won2020",
                      weight_decay=1e-4)


@dataclass(frozen=True)
class Phase:
    """Epochs [start, end) (0-based, as model.fit counts them) with one optimizer setting."""
    start: int
    end: int
    optimizer: str
    lr: float
    momentum: float = 0.0
    nesterov: bool = False
    reload_best: bool = False     # at its start: the weights of the best epoch so far by validation loss

    def same_optimizer(self, other):
        """True when going from `other` to this phase only changes the learning rate (the optimizer's
        state, e.g. SGD's momentum, carries on, as it does in the reference)."""
        return other is not None and (self.optimizer, self.momentum, self.nesterov) == (
            other.optimizer, other.momentum, other.nesterov)


def check(text):
    """None, or what is wrong with a --schedule value."""
    name, _, switches = text.partition(":")
    if name not in NAMES:
        return f"--schedule {text}: unknown schedule (known: {', '.join(NAMES)}; won2020:A,B,C sets its switch epochs)"
    if switches:
        if name != "won2020":
            return f"--schedule {text}: only won2020 takes switch epochs"
        try:
            epochs = [int(e) for e in switches.split(",")]
        except ValueError:
            epochs = []
        if len(epochs) != 3 or not 0 < epochs[0] < epochs[1] < epochs[2]:
            return f"--schedule {text}: give three increasing epochs, e.g. won2020:80,100,120"
    return None


def phases(schedule, optimizer, lr, momentum, epochs):
    """The phases of a run of `epochs` epochs (those that start before its end)."""
    name, _, switches = schedule.partition(":")
    first = Phase(0, epochs, optimizer, lr, momentum)
    if name == "constant":
        return [first]
    starts = tuple(int(e) for e in switches.split(",")) if switches else WON2020_SWITCHES
    bounds = [0, *starts, epochs]
    settings = [(optimizer, lr, momentum, False, False)] + [("sgd", rate, 0.9, True, True) for rate in WON2020_SGD]
    out = []
    for (start, end), (opt, rate, mom, nesterov, reload) in zip(zip(bounds, bounds[1:]), settings):
        if start < min(end, epochs):
            out.append(Phase(start, min(end, epochs), opt, rate, mom, nesterov, reload))
    return out
