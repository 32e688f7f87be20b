"""The memory budget both daemons admit requests through, on its own: what it
refuses, what it waits for, and that nothing is held after a request ends."""

from __future__ import annotations

import asyncio

import pytest

from runtimes.admission import MIB, Admission, LiveTraffic, MemoryBudget, Overloaded, TooLarge


def test_a_call_the_budget_cannot_take_now_is_refused_with_the_figures() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(4 * MIB, retry_after_ms=lambda: 120.0)
        async with budget.hold(3 * MIB):
            with pytest.raises(Overloaded, match="hold 3.0 of the 4 MiB") as refused:
                async with budget.hold(2 * MIB):
                    pass
            assert refused.value.retry_after_ms == 120.0
        assert budget.held_bytes == 0

    asyncio.run(scenario())


def test_growing_waits_for_a_running_request_and_refuses_what_never_fits() -> None:
    async def scenario() -> list[str]:
        budget = MemoryBudget(10 * MIB)
        order: list[str] = []
        finish_first = asyncio.Event()

        async def first() -> None:
            async with budget.hold(1 * MIB) as held:
                await held.grow_to(6 * MIB)
                order.append("first running")
                await finish_first.wait()
            order.append("first done")

        async def second() -> None:
            async with budget.hold(1 * MIB) as held:
                await held.grow_to(6 * MIB)  # 6 + 6 > 10: waits for the first to end
                order.append("second running")

        tasks = [asyncio.create_task(first())]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(second()))
        await asyncio.sleep(0.01)
        assert order == ["first running"]
        finish_first.set()
        await asyncio.gather(*tasks)
        with pytest.raises(TooLarge, match="more than this daemon's whole 10 MiB"):
            async with budget.hold(1 * MIB) as held:
                await held.grow_to(11 * MIB)
        assert budget.held_bytes == 0
        return order

    assert asyncio.run(scenario()) == ["first running", "first done", "second running"]


def test_waiting_calls_alone_holding_the_rest_refuse_instead_of_waiting_for_ever() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(4 * MIB)
        async with budget.hold(3 * MIB), budget.hold(1 * MIB) as held:  # the first never starts running
            with pytest.raises(Overloaded, match="waiting requests hold"):
                await asyncio.wait_for(held.grow_to(2 * MIB), timeout=10)
        assert budget.held_bytes == 0

    asyncio.run(scenario())


def test_a_cancelled_wait_gives_its_bytes_back() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(4 * MIB)

        async def waiter() -> None:
            async with budget.hold(1 * MIB) as held:
                await held.grow_to(3 * MIB)

        async with budget.hold(1 * MIB) as running:
            await running.grow_to(2 * MIB)
            task = asyncio.create_task(waiter())
            await asyncio.sleep(0.01)
            assert budget.held_bytes == 3 * MIB
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert budget.held_bytes == 2 * MIB
        assert budget.held_bytes == 0

    asyncio.run(scenario())


def test_a_flooding_caller_keeps_to_its_share_and_the_other_is_served_in_turn() -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        admission = Admission(max_concurrency=1, max_queue=8, max_queue_per_key=4)
        order: list[str] = []
        refused: list[str] = []
        gate = asyncio.Event()

        async def call(key: str, name: str) -> None:
            try:
                async with admission.slot(key):
                    order.append(name)
                    await gate.wait()
            except Overloaded as exc:
                refused.append(f"{name}: {exc}")

        tasks = [asyncio.create_task(call("a", f"a{i}")) for i in range(8)]  # 1 runs, 4 wait, 3 refused
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(call("b", f"b{i}")) for i in range(2)]
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*tasks)
        return order, refused

    order, refused = asyncio.run(scenario())
    assert order == ["a0", "b0", "a1", "b1", "a2", "a3", "a4"]  # turns alternate while both wait
    assert len(refused) == 3 and all("its share 4" in r for r in refused) and all(r.startswith("a") for r in refused)


def test_a_cancelled_waiter_leaves_the_line_and_a_cancelled_grant_passes_the_slot_on() -> None:
    async def scenario() -> list[str]:
        admission = Admission(max_concurrency=1, max_queue=4)
        order: list[str] = []

        async def call(name: str, hold: asyncio.Event | None = None) -> None:
            async with admission.slot(name):
                order.append(name)
                if hold:
                    await hold.wait()

        hold = asyncio.Event()
        first = asyncio.create_task(call("first", hold))
        await asyncio.sleep(0)
        waiting = asyncio.create_task(call("cancelled"))
        last = asyncio.create_task(call("last"))
        await asyncio.sleep(0)
        waiting.cancel()
        hold.set()
        await asyncio.gather(first, last, waiting, return_exceptions=True)
        assert admission.idle() and admission._free == 1
        return order

    assert asyncio.run(scenario()) == ["first", "last"]


def test_live_traffic_says_when_the_device_is_in_use_and_when_a_gap_comes() -> None:
    now = [100.0]
    traffic = LiveTraffic(clock=lambda: now[0])
    assert not traffic.recent(1.0)

    async def scenario() -> None:
        with traffic.running():
            assert traffic.recent(1.0) and traffic.in_flight == 1
            waiting = asyncio.ensure_future(traffic.quiet(max_wait_s=30))
            await asyncio.sleep(0.01)
            assert not waiting.done()  # a request runs: no gap yet
            now[0] += 5.0
            assert traffic.recent(1.0)  # running for long still counts
        await asyncio.wait_for(waiting, 1)  # the gap comes as soon as it ends
        now[0] += 0.5
        assert traffic.recent(1.0) and not traffic.recent(0.25)
        await asyncio.wait_for(traffic.quiet(max_wait_s=30), 1)  # nothing runs: at once

    asyncio.run(scenario())
