"""Studies: several training runs made by one command and summarised together.

``python -m experiments KIND --study-dir DIR [options] [-- training options]``; see
``docs/studies.md``. Kinds: ``seeds`` (:mod:`experiments.seeds`). The study folder and the
running of its members are in :mod:`experiments.study`.
"""
