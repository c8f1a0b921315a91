// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AttributionLedger} from "../../AttributionLedger.sol";
import {IAttributionLedger} from "../../interfaces/IAttributionLedger.sol";
import {FeeOnTransferToken} from "../FeeOnTransferToken.sol";
import {LedgerWorld, Rewards2} from "./LedgerFixture.sol";
import {Check, VmGas} from "./Vm.sol";

/// @title LedgerFuzzTest
/// @notice Fuzzed single properties, and gas snapshots of a claim at 0 and 1,000 pending epochs.
contract LedgerFuzzTest is Check {
    address internal constant OP = address(0xA1);
    address internal constant ALICE = address(0xC1);
    address internal constant BOB = address(0xC2);
    LedgerWorld internal world;
    AttributionLedger internal ledger;

    function setUp() public {
        world = new LedgerWorld();
        ledger = world.ledger();
        world.addOperator(OP);
    }

    /// Claims pay exactly the increase of the cumulative amount, never more than the root's total.
    function testFuzz_claimsPayTheIncrease(uint96 a1, uint96 b1, uint96 da, uint96 db) public {
        vm.assume(uint256(a1) + b1 > 0 && a1 > 0);
        world.submit(OP, ALICE, a1, BOB, b1);
        vm.warp(block.timestamp + world.DELAY());
        ledger.claim(OP, 1, ALICE, a1, Rewards2.proof(BOB, b1));
        uint256 a2 = uint256(a1) + da;
        uint256 b2 = uint256(b1) + db;
        world.submit(OP, ALICE, a2, BOB, b2);
        vm.warp(block.timestamp + world.DELAY());
        if (da > 0) ledger.claim(OP, 2, ALICE, a2, Rewards2.proof(BOB, b2));
        if (b2 > 0) ledger.claim(OP, 2, BOB, b2, Rewards2.proof(ALICE, a2));
        _eq(world.token().balanceOf(ALICE), a2, "alice");
        _eq(world.token().balanceOf(BOB), b2, "bob");
        _eq(ledger.claimedTotal(OP), a2 + b2, "claimedTotal");
        _le(ledger.claimedTotal(OP), ledger.fundedTotal(OP), "claimed <= funded");
        _eq(world.token().balanceOf(address(ledger)), 0, "nothing left");
    }

    /// A token that delivers less than pulled is refused, whatever the fee and amount.
    function testFuzz_feeOnTransferRefused(uint16 feeBps, uint112 amount) public {
        feeBps = uint16(1 + feeBps % 10_000);
        vm.assume(amount > 0 && (uint256(amount) * feeBps) / 10_000 > 0);
        FeeOnTransferToken fot = new FeeOnTransferToken(feeBps);
        AttributionLedger led = new AttributionLedger(address(this), address(fot), 1, 7000, 2000, 1000);
        fot.mint(address(this), amount);
        fot.approve(address(led), amount);
        uint256 arrives = amount - (uint256(amount) * feeBps) / 10_000;
        vm.expectRevert(abi.encodeWithSelector(IAttributionLedger.LedgerTransferShortfall.selector, uint256(amount), arrives));
        led.submitEpoch(1, bytes32("r"), 1, Rewards2.root(ALICE, amount, BOB, 0), bytes32("x"), amount, 0);
    }

    /// A revoked epoch, and every epoch built on it, never pays however long one waits.
    function testFuzz_revokedNeverPays(uint96 honest, uint96 stolen, uint8 extra, uint32 wait) public {
        vm.assume(honest > 0);
        world.submit(OP, ALICE, honest, BOB, 0);
        vm.warp(block.timestamp + world.DELAY());
        uint64 bad = world.submit(OP, ALICE, honest, BOB, uint256(stolen) + 1);
        for (uint8 i = 0; i < extra % 5; ++i) world.submit(OP, ALICE, honest, BOB, uint256(stolen) + 2 + i);
        vm.prank(world.guardian());
        ledger.revokeRoot(OP, bad);
        vm.warp(block.timestamp + world.DELAY() + wait);
        uint64 last = ledger.lastEpoch(OP);
        for (uint64 e = bad; e <= last; ++e) {
            vm.expectRevert(abi.encodeWithSelector(IAttributionLedger.LedgerEpochRevoked.selector, OP, e));
            ledger.claim(OP, e, BOB, uint256(stolen) + 1 + (e - bad), Rewards2.proof(ALICE, honest));
        }
        _eq(world.token().balanceOf(BOB), 0, "bob was paid from a revoked root");
        (uint64 inEffect,,) = ledger.rootInEffect(OP);
        _eq(inEffect, 1, "root in effect");
    }

    /// Gas of a claim (fresh account, pointer already on the epoch) at 0 and 1,000 pending epochs: the same.
    /// Written to test/foundry/snapshots/LedgerFuzzTest.json (execution gas of the call, no intrinsic cost).
    function test_gasClaimAt0And1000Pending() public {
        world.submit(OP, ALICE, 1e18, BOB, 2e18);
        world.submit(OP, ALICE, 1e18, BOB, 2e18);
        vm.warp(block.timestamp + world.DELAY());
        ledger.advance(OP, 2);
        VmGas g = VmGas(address(vm));
        uint256 before = gasleft();
        ledger.claim(OP, 2, ALICE, 1e18, Rewards2.proof(BOB, 2e18));
        uint256 at0 = before - gasleft();
        g.snapshotValue("claim_0_pending", at0);
        for (uint256 i = 0; i < 1000; ++i) world.submit(OP, ALICE, 1e18, BOB, 2e18);
        _eq(ledger.lastEpoch(OP), 1002, "epochs");
        before = gasleft();
        ledger.claim(OP, 2, BOB, 2e18, Rewards2.proof(ALICE, 1e18));
        uint256 at1000 = before - gasleft();
        g.snapshotValue("claim_1000_pending", at1000);
        _le(at1000, at0 + 200, "claim gas grew with pending epochs");
        vm.prank(world.guardian());
        ledger.revokeRoot(OP, 3); // all 1,000 pending epochs at once
        world.submit(OP, ALICE, 3e18, BOB, 2e18);
        vm.warp(block.timestamp + world.DELAY());
        before = gasleft();
        ledger.claim(OP, 1003, ALICE, 3e18, Rewards2.proof(BOB, 2e18));
        uint256 advanced = before - gasleft();
        g.snapshotValue("claim_advancing_past_1000_revoked", advanced);
        _le(advanced, at0 + 30_000, "advancing past revoked epochs grew with their number");
    }
}
