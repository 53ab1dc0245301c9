def test_backdoor_fixture_really_carries_a_backdoor(backdoor_case):
    # The fixture asserts it on creation; this test makes the numbers visible in -v output.
    assert backdoor_case.before["asr"] > 90
    assert backdoor_case.before["acc"] > 90
    assert len(backdoor_case.clean) == 500
