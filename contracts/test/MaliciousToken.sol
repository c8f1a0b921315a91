// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title MaliciousToken
/// @notice Test-only ERC-20 that, once armed, calls back into a target (the ledger) from inside `transfer` and
///         `transferFrom`, bubbling up any revert. Used to prove the ledger's reentrancy guard holds.
contract MaliciousToken is ERC20 {
    address private _target;
    bytes private _payload;
    bool private _armed;

    /// @notice The armed callback into `target` ran and succeeded (it should never happen against the ledger).
    event Reentered(address indexed target);

    /// @notice Creates the token with no supply.
    constructor() ERC20("Malicious", "MAL") {}

    /// @notice Mints `amount` to `to`, unrestricted (test token).
    /// @param to Receiver.
    /// @param amount Token units.
    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    /// @notice Arms the callback: the next `transfer`/`transferFrom` calls `target` with `payload` (once).
    /// @param target Contract to call back into.
    /// @param payload ABI-encoded call.
    function arm(address target, bytes calldata payload) external {
        _target = target;
        _payload = payload;
        _armed = true;
    }

    /// @notice ERC-20 transfer that first runs the armed callback.
    /// @param to Receiver.
    /// @param value Token units.
    /// @return ok Always true (reverts on failure).
    function transfer(address to, uint256 value) public override returns (bool ok) {
        _reenter();
        return super.transfer(to, value);
    }

    /// @notice ERC-20 transferFrom that first runs the armed callback.
    /// @param from Owner.
    /// @param to Receiver.
    /// @param value Token units.
    /// @return ok Always true (reverts on failure).
    function transferFrom(address from, address to, uint256 value) public override returns (bool ok) {
        _reenter();
        return super.transferFrom(from, to, value);
    }

    /// @dev Calls the armed target once, re-raising its revert data unchanged.
    function _reenter() private {
        if (!_armed) return;
        _armed = false;
        (bool success, bytes memory ret) = _target.call(_payload);
        if (!success) {
            assembly ("memory-safe") {
                revert(add(ret, 0x20), mload(ret))
            }
        }
        emit Reentered(_target);
    }
}
