"""``python -m softlabels ...`` is the ``softlabels`` command; ``torchrun -m softlabels train ...``
starts it once per rank."""

from softlabels.cli.app import main

if __name__ == "__main__":
    main()
