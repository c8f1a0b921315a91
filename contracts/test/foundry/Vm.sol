// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title Vm
/// @notice The few forge cheatcodes our suites use (forge answers calls to this address); written here so the
///         suites need no downloaded test library.
interface Vm {
    function warp(uint256 timestamp) external;
    function prank(address sender) external;
    function startPrank(address sender) external;
    function stopPrank() external;
    function expectRevert(bytes4 selector) external;
    function expectRevert(bytes calldata revertData) external;
    function assume(bool condition) external;
    function label(address account, string calldata name) external;
}

/// @title Check
/// @notice Base of our forge suites: the cheatcode handle, assertions that revert with a message, invariant target
///         selection (forge reads `targetContracts()` / `targetSelectors()`), and gas snapshots.
abstract contract Check {
    Vm internal constant vm = Vm(address(uint160(uint256(keccak256("hevm cheat code")))));

    struct FuzzSelector {
        address addr;
        bytes4[] selectors;
    }

    address[] private _targets;
    FuzzSelector[] private _selectors;

    /// @dev forge runs test functions only in contracts with IS_TEST = true.
    bool public IS_TEST = true;

    function targetContracts() public view returns (address[] memory) {
        return _targets;
    }

    function targetSelectors() public view returns (FuzzSelector[] memory) {
        return _selectors;
    }

    function _target(address c, bytes4[] memory selectors) internal {
        _targets.push(c);
        _selectors.push(FuzzSelector(c, selectors));
    }

    function _eq(uint256 a, uint256 b, string memory what) internal pure {
        if (a != b) revert(string.concat(what, ": ", _str(a), " != ", _str(b)));
    }

    function _le(uint256 a, uint256 b, string memory what) internal pure {
        if (a > b) revert(string.concat(what, ": ", _str(a), " > ", _str(b)));
    }

    function _true(bool c, string memory what) internal pure {
        if (!c) revert(what);
    }

    function _str(uint256 v) internal pure returns (string memory) {
        if (v == 0) return "0";
        bytes memory b = new bytes(78);
        uint256 n;
        while (v != 0) {
            b[77 - n++] = bytes1(uint8(48 + (v % 10)));
            v /= 10;
        }
        bytes memory out = new bytes(n);
        for (uint256 i = 0; i < n; ++i) out[i] = b[78 - n + i];
        return string(out);
    }
}

/// @title VmGas
/// @notice Forge's gas-snapshot cheatcodes (values land in the `snapshots` folder of contracts/foundry.toml).
interface VmGas {
    function snapshotValue(string calldata name, uint256 value) external;
}
