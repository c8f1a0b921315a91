// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AttributionLedger} from "../../AttributionLedger.sol";
import {RewardToken} from "../../RewardToken.sol";
import {Vm} from "./Vm.sol";

/// @title Rewards2
/// @notice Two-leaf StandardMerkleTree over (account, cumulativeAmount), as the node builds it.
library Rewards2 {
    function leaf(address account, uint256 amount) internal pure returns (bytes32) {
        return keccak256(bytes.concat(keccak256(abi.encode(account, amount))));
    }

    function root(address a, uint256 x, address b, uint256 y) internal pure returns (bytes32) {
        bytes32 l1 = leaf(a, x);
        bytes32 l2 = leaf(b, y);
        return l1 < l2 ? keccak256(abi.encode(l1, l2)) : keccak256(abi.encode(l2, l1));
    }

    /// @dev Proof of the leaf (a, x): its sibling (b, y).
    function proof(address b, uint256 y) internal pure returns (bytes32[] memory p) {
        p = new bytes32[](1);
        p[0] = leaf(b, y);
    }
}

/// @title LedgerWorld
/// @notice A token and a ledger with a challenge delay; operators funded and approved; the guardian apart.
contract LedgerWorld {
    Vm internal constant VM = Vm(address(uint160(uint256(keccak256("hevm cheat code")))));
    uint64 public constant DELAY = 1 hours;

    RewardToken public token;
    AttributionLedger public ledger;
    address public immutable guardian = address(0x6A);

    constructor() {
        token = new RewardToken("Reward", "RWD", address(this));
        ledger = new AttributionLedger(address(this), address(token), DELAY, 7000, 2000, 1000);
        ledger.grantRole(ledger.GUARDIAN_ROLE(), guardian);
    }

    function addOperator(address op) public {
        ledger.grantRole(ledger.OPERATOR_ROLE(), op);
        token.mint(op, 1e30);
        VM.prank(op);
        token.approve(address(ledger), type(uint256).max);
    }

    /// @dev Submits `op`'s next epoch on its live tip: two accounts with these cumulative amounts.
    function submit(address op, address a, uint256 x, address b, uint256 y) public returns (uint64 epoch) {
        epoch = ledger.lastEpoch(op) + 1;
        uint64 parent = ledger.liveTip(op);
        VM.prank(op);
        ledger.submitEpoch(
            epoch,
            keccak256(abi.encode("records", op, epoch)),
            1,
            Rewards2.root(a, x, b, y),
            keccak256(abi.encode("export", op, epoch)),
            x + y,
            parent
        );
    }

    function sweepTo(address to) external returns (uint256) {
        return ledger.sweep(to);
    }

    function mintTo(address to, uint256 amount) external {
        token.mint(to, amount);
    }
}
