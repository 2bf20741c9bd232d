"""Which steps save a frame (dynamics/schedule.py): multiples of save_every, log-spaced steps, the last step."""

from lattice_lab.dynamics.schedule import SaveSchedule


def test_regular_frames_only_by_default():
    s = SaveSchedule(50)
    assert [t for t in range(0, 201) if t in s] == [0, 50, 100, 150, 200]
    assert s.count(0, 200) == 4 and s.count(49, 100) == 2


def test_log_spaced_frames_are_added_and_do_not_depend_on_the_run_length():
    s = SaveSchedule(50, per_decade=4)
    saved = [t for t in range(0, 201) if t in s]
    assert saved == [0, 1, 2, 3, 6, 10, 18, 32, 50, 56, 100, 150, 178, 200]  # round(10^(j/4)) and 50 k
    assert s.count(0, 200) == len(saved) - 1 and s.count(10, 100) == 5  # 18, 32, 50, 56, 100
    longer = SaveSchedule(50, per_decade=4)
    assert [t for t in range(0, 201) if t in longer] == saved  # asked in another order: the same steps
    assert 316 in longer and 562 in longer and 1000 in longer and 317 not in longer
    assert SaveSchedule(50, per_decade=4).count(0, 1000) == 20 + 11  # 50 k; 1, 2, 3, 6, 10, 18, 32, 56, 178, 316, 562


def test_the_last_step_is_saved_whatever_save_every():
    """steps=210, save_every=20 ended its trajectory at step 200; save_every=1000 over 200 steps saved step 0 only."""
    s = SaveSchedule(20, final=210)
    assert [t for t in range(0, 211) if t in s] == list(range(0, 201, 20)) + [210]
    assert s.count(0, 210) == 11 and s.count(0, 200) == 10 and s.count(200, 210) == 1 and s.count(210, 300) == 5
    assert [t for t in range(0, 201) if t in SaveSchedule(1000, final=200)] == [0, 200]
    assert SaveSchedule(50, final=200).count(0, 200) == 4  # a multiple of save_every: counted once
    assert SaveSchedule(50, per_decade=4, final=56).count(0, 56) == 9  # a log-spaced step: counted once
    assert 210 not in SaveSchedule(20)  # without final: the steps every run length saves
