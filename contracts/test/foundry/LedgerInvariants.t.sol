// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AttributionLedger} from "../../AttributionLedger.sol";
import {LedgerWorld, Rewards2} from "./LedgerFixture.sol";
import {Check, Vm} from "./Vm.sol";

/// @title LedgerHandler
/// @notice What forge calls at random in the invariant run: three operators submit epochs (honest, or inflated
///         ones a stolen key would post), the guardian revokes pending ones, time jumps, anyone claims against
///         any epoch (revoked ones included), operators take back credit, strangers send tokens, the admin sweeps.
///         Ghost state records what the ledger must never do.
contract LedgerHandler {
    Vm internal constant VM = Vm(address(uint160(uint256(keccak256("hevm cheat code")))));

    LedgerWorld public immutable world;
    AttributionLedger public immutable ledger;
    address[3] public ops = [address(0xA1), address(0xA2), address(0xA3)];
    address public constant ALICE = address(0xC1);
    address public constant BOB = address(0xC2);

    mapping(address op => mapping(uint64 epoch => uint256[2])) public amountsOf; // (alice, bob) per epoch
    mapping(address op => uint256) public refunded;
    uint256 public stray; // sent to the ledger directly, not yet swept
    bool public paidFromRevoked;
    bool public claimedDecreased;
    bool public sweptTooMuch;
    mapping(address op => uint256) public lastClaimedTotal;
    mapping(address op => mapping(address account => uint256)) public lastClaimed;
    uint256 public calls;

    constructor(LedgerWorld w) {
        world = w;
        ledger = w.ledger();
    }

    modifier tracked() {
        _;
        ++calls;
        for (uint256 i = 0; i < 3; ++i) {
            address op = ops[i];
            uint256 t = ledger.claimedTotal(op);
            if (t < lastClaimedTotal[op]) claimedDecreased = true;
            lastClaimedTotal[op] = t;
            for (uint256 j = 0; j < 2; ++j) {
                address acct = j == 0 ? ALICE : BOB;
                uint256 c = ledger.claimed(op, acct);
                if (c < lastClaimed[op][acct]) claimedDecreased = true;
                lastClaimed[op][acct] = c;
            }
        }
    }

    function submit(uint256 opSeed, uint96 addA, uint96 addB) external tracked {
        address op = ops[opSeed % 3];
        uint64 tip = ledger.liveTip(op);
        uint256 x = amountsOf[op][tip][0] + (addA % 1e24);
        uint256 y = amountsOf[op][tip][1] + (addB % 1e24);
        if (x + y == 0) x = 1;
        uint64 e = world.submit(op, ALICE, x, BOB, y);
        amountsOf[op][e] = [x, y];
    }

    function warp(uint32 dt) external tracked {
        VM.warp(block.timestamp + (dt % (3 * world.DELAY())));
    }

    function revoke(uint256 opSeed, uint8 back) external tracked {
        address op = ops[opSeed % 3];
        uint64 e = ledger.liveTip(op);
        for (uint8 i = 0; i < back % 4 && e != 0; ++i) {
            uint64 prev = ledger.getEpoch(op, e).previousLive;
            if (prev == 0 || block.timestamp >= ledger.effectiveAt(op, prev)) break;
            e = prev;
        }
        if (e == 0 || block.timestamp >= ledger.effectiveAt(op, e)) return;
        VM.prank(world.guardian());
        ledger.revokeRoot(op, e);
    }

    function claim(uint256 opSeed, uint64 epochSeed, bool bob, bool batch) external tracked {
        address op = ops[opSeed % 3];
        uint64 last = ledger.lastEpoch(op);
        if (last == 0) return;
        uint64 e = 1 + epochSeed % last;
        uint256[2] memory am = amountsOf[op][e];
        (address who, uint256 amt, address other, uint256 oamt) = bob ? (BOB, am[1], ALICE, am[0]) : (ALICE, am[0], BOB, am[1]);
        bytes32[] memory proof = Rewards2.proof(other, oamt);
        bool revokedBefore = ledger.isRevoked(op, e);
        bool ok;
        if (batch) {
            address[] memory accts = new address[](1);
            uint256[] memory vals = new uint256[](1);
            bytes32[][] memory proofs = new bytes32[][](1);
            (accts[0], vals[0], proofs[0]) = (who, amt, proof);
            try ledger.claimMany(op, e, accts, vals, proofs) returns (uint256 paid) {
                ok = paid > 0;
            } catch {}
        } else {
            try ledger.claim(op, e, who, amt, proof) {
                ok = true;
            } catch {}
        }
        if (ok && (revokedBefore || ledger.isRevoked(op, e))) paidFromRevoked = true;
    }

    function refund(uint256 opSeed) external tracked {
        address op = ops[opSeed % 3];
        VM.prank(op);
        try ledger.refundCredit() returns (uint256 amount) {
            refunded[op] += amount;
        } catch {}
    }

    function sendStray(uint64 amount) external tracked {
        world.mintTo(address(ledger), amount);
        stray += amount;
    }

    function sweep() external tracked {
        try world.sweepTo(address(0xBEEF)) returns (uint256 amount) {
            if (amount != stray) sweptTooMuch = true;
            stray = 0;
        } catch {
            if (stray != 0) sweptTooMuch = true; // there was something to sweep
        }
    }
}

/// @title LedgerInvariantsTest
/// @notice The ledger's books hold over random sequences of the handler's actions.
contract LedgerInvariantsTest is Check {
    LedgerWorld internal world;
    AttributionLedger internal ledger;
    LedgerHandler internal handler;

    function setUp() public {
        world = new LedgerWorld();
        ledger = world.ledger();
        handler = new LedgerHandler(world);
        for (uint256 i = 0; i < 3; ++i) world.addOperator(handler.ops(i));
        bytes4[] memory sel = new bytes4[](7);
        sel[0] = LedgerHandler.submit.selector;
        sel[1] = LedgerHandler.warp.selector;
        sel[2] = LedgerHandler.revoke.selector;
        sel[3] = LedgerHandler.claim.selector;
        sel[4] = LedgerHandler.refund.selector;
        sel[5] = LedgerHandler.sendStray.selector;
        sel[6] = LedgerHandler.sweep.selector;
        _target(address(handler), sel);
    }

    /// per operator, claimed <= funded - refunded (and so <= funded)
    function invariant_claimedWithinFunded() public view {
        for (uint256 i = 0; i < 3; ++i) {
            address op = handler.ops(i);
            _le(ledger.claimedTotal(op) + ledger.refundedTotal(op), ledger.fundedTotal(op), "claimed+refunded > funded");
            _eq(ledger.refundedTotal(op), handler.refunded(op), "refunded");
        }
    }

    /// balance = sum over operators of (funded - claimed - refunded) + stray tokens not yet swept
    function invariant_balanceIsOwedPlusStray() public view {
        uint256 owed;
        for (uint256 i = 0; i < 3; ++i) {
            address op = handler.ops(i);
            owed += ledger.fundedTotal(op) - ledger.claimedTotal(op) - ledger.refundedTotal(op);
        }
        _eq(ledger.owedTotal(), owed, "owedTotal");
        _eq(world.token().balanceOf(address(ledger)), owed + handler.stray(), "ledger balance");
        _true(!handler.sweptTooMuch(), "sweep took owed tokens or missed stray ones");
    }

    /// claimed (per operator and per account) never decreases
    function invariant_claimedNeverDecreases() public view {
        _true(!handler.claimedDecreased(), "a claimed total decreased");
    }

    /// a revoked root is never payable, and the effective epoch is never a revoked one
    function invariant_revokedRootNeverPays() public view {
        _true(!handler.paidFromRevoked(), "a claim against a revoked epoch paid");
        for (uint256 i = 0; i < 3; ++i) {
            address op = handler.ops(i);
            uint64 e = ledger.effectiveEpoch(op);
            _true(e == 0 || !ledger.isRevoked(op, e), "the effective epoch is revoked");
            // what the effective root pays is covered by what the operator holds here
            if (e != 0) _le(ledger.getEpoch(op, e).cumulativeTotal, ledger.fundedTotal(op) - ledger.refundedTotal(op), "cap");
        }
    }
}
