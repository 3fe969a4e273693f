"""Ray entry points (Train, Data, Tune): the only part of the package that imports Ray."""
